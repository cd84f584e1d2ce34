"""The checks `xenlab verify` runs (see verify.py for states and the runner).

Each takes the run's Context and returns its evidence (one line, or
(line, details), or (line, details, data): `data` holds the check's figures
as JSON fields, for a user to plot without parsing the line), or a list of
Results, or raises CheckFailed. None of them
re-implements a check: they call the library's own."""

from __future__ import annotations

import json
import time

from xenlab.agent.facts import CONNECTED, NO_HVM_PAGING, QEMU7_XBEGIN, XEN_TOOL_TESTS, XEN_VERSIONS
from xenlab.agent.xl import parse_xl_list
from xenlab.errors import XenlabError
from xenlab.evtchn.catalogue import catalogue
from xenlab.evtchn.devchan import devchan
from xenlab.evtchn.ping import ping, placement_text
from xenlab.lab.state import READY_CHECK, REQUIRED_READY
from xenlab.verify.crash import detect_crash
from xenlab.verify.model import DEVCHAN_ARGS, PING_COUNT, TOOL_TEST_TIMEOUT, CheckFailed, Context, Result, one_line
from xenlab.xenstore.layout import check_domain
from xenlab.xenstore.perms import check_guest
from xenlab.xenstore.recorder import settled, traced
from xenlab.xenstore.tracer import check, format_reports, format_timeline, state_name, violation_summary


def boot(ctx: Context):
    """The lab is up (booted here when it was not) and runs the Xen of its dom0 suite (4.17 on bookworm)."""
    lab = ctx.lab
    if lab.info() is None or not lab.running():
        ctx.log(f"  lab {lab.name} is not up: booting it")
        ctx.booted_here = lab.ensure_up()
    st = lab.status()
    if st["state"] != "up":
        raise CheckFailed(f"lab {lab.name} is {st['state']}", st.get("hint", ""))
    started = lab.running_config()
    suite = started.dom0.suite
    if not st["xen_version"].startswith(XEN_VERSIONS[suite] + ".") and not started.xen:
        raise CheckFailed(f"Xen {st['xen_version']} answers, not {suite}'s {XEN_VERSIONS[suite]}")
    boot = (f"restored from snapshot {st['snapshot']} in {st['boot_seconds']:.1f} s" if st.get("restored")
            else f"booted in {st['boot_seconds']:.1f} s")
    how = f"{boot} now" if ctx.booted_here else f"already up {st['uptime_seconds']:.0f} s ({boot})"
    qemu = st.get("versions", {}).get("qemu")
    data = {"xen_version": st["xen_version"], "accel": st["accel"], "cpu": st["cpu"], "qemu": qemu,
            "dom0_memory_mib": st["dom0"]["memory_mib"], "dom0_vcpus": st["dom0"]["vcpus"], "booted_here": bool(ctx.booted_here),
            "restored": bool(st.get("restored")), "boot_seconds": st["boot_seconds"], "uptime_seconds": st["uptime_seconds"]}
    return (f"Xen {st['xen_version']} ({st['accel'].upper()}, {st['cpu']}, QEMU {qemu}), dom0 {st['dom0']['memory_mib']} MiB/{st['dom0']['vcpus']} vCPUs, "
            f"{how}, SSH 127.0.0.1:{st['ssh_port']}"), "", data


def dom0_services(ctx: Context):
    """xenstored and xenconsoled run; /dev/xen/{evtchn,gntdev,gntalloc} exist; XenStore answers."""
    with ctx.lab.ssh() as ssh:
        found = set(ssh.check(READY_CHECK).split())
    missing = REQUIRED_READY - found
    if missing:
        raise CheckFailed(f"dom0 lacks {', '.join(sorted(missing))}")
    name = ctx.store().read("/local/domain/0/name")
    return f"xenstored and xenconsoled running, /dev/xen/evtchn, gntdev, gntalloc present; XenStore answers (/local/domain/0/name = {name})"


def guest_create(ctx: Context):
    """A python domU with a rw and a ro disk and a NIC, created while its XenBus states are traced."""
    ctx.guests = ctx.lab.guests()
    if any(g["name"] == ctx.guest for g in ctx.guests.list()):
        ctx.log(f"  a guest named {ctx.guest} is left from an earlier run: destroying it")
        ctx.guests.destroy(ctx.guest)
    spec = ctx.spec()
    prepared = ctx.guests.prepare(spec)  # kernel and root built/shipped before the trace starts
    with traced(ctx.store(), ctx.guest) as recorder:
        ctx.traces["create"] = recorder.timeline  # the live list: kept when the create fails half-way
        ctx.created = ctx.guests.create(spec, prepared)
        recorder.wait(settled(False), 15)
    ctx.timeline = list(recorder.timeline)
    ctx.domid = ctx.created["domid"]
    devs = ctx.created["devices"]
    not_connected = [f"{d['kind']}/{d['devid']}" for d in devs if d["frontend_state"] != str(CONNECTED) or d["backend_state"] != str(CONNECTED)]
    kinds = sorted(f"{d['kind']}/{d['devid']}" for d in devs)
    if len(devs) != len(spec.disks) + 1 or not_connected:
        raise CheckFailed(f"devices {kinds}, not Connected: {not_connected}")
    t = ctx.created["timings"]
    data = {"domid": ctx.domid, "devices": len(devs), "xl_create_seconds": t["xl_create"], "connected_seconds": t["connected"],
            "ready_seconds": t["ready"], "total_seconds": t.get("total")}
    return (f"{ctx.guest} is domid {ctx.domid} ({ctx.created['ip']}), {', '.join(kinds)} Connected both sides; "
            f"xl create {t['xl_create']:.1f} s, Connected {t['connected']:.1f} s, ready {t['ready']:.1f} s"), "", data


def _trace_verdict(timeline, expect_phase: str):

    reports = check(timeline)
    text = "\n".join(format_reports(reports) + ["", "timeline:"] + format_timeline(timeline))
    if not reports:
        raise CheckFailed("no XenBus state change of the guest's devices was seen", text)
    problem = violation_summary(reports)
    if problem:
        raise CheckFailed(problem, text)
    missing = [r.device for r in reports if expect_phase not in " ".join(r.phases)]
    if missing:
        raise CheckFailed(f"{', '.join(missing)}: no complete {expect_phase} seen", text)
    return reports, text


def trace_create(ctx: Context):
    """Every vbd and vif went Initialising -> InitWait/Initialised -> Connected in the order the split-driver protocol allows."""
    reports, text = _trace_verdict(ctx.timeline, "bring-up")
    short = {"Initialising": "Init", "InitWait": "Wait", "Initialised": "Initd", "Connected": "Conn"}

    def states(seq) -> str:
        return ">".join(short.get(state_name(s), state_name(s)) for s in seq)

    per = "; ".join(f"{r.device} be {states(r.backend)} fe {states(r.frontend)}" for r in reports)
    return f"{len(ctx.timeline)} state changes, no violation: {per}", text, {"state_changes": len(ctx.timeline), "devices": len(reports)}


def xenstore_layout(ctx: Context):
    """Frontend and backend directories point at each other; rings and event channels published."""
    assert ctx.domid is not None  # set by guest.create, which this check needs
    layouts = check_domain(ctx.store(), ctx.domid)
    text = "\n".join(f"{d.kind}/{d.devid}: {d.backend} fe {d.frontend_state} be {d.backend_state} rings {d.rings} evtchn {d.event_channels}"
                     + "".join(f"\n  problem: {p}" for p in d.problems) for d in layouts)
    problems = [f"{d.kind}/{d.devid}: {p}" for d in layouts for p in d.problems]
    if problems:
        raise CheckFailed(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""), text)
    if len(layouts) != len(ctx.spec().disks) + 1:
        raise CheckFailed(f"{len(layouts)} devices in XenStore, expected {len(ctx.spec().disks) + 1}", text)
    rings = sum(len(d.rings) for d in layouts)
    chans = sum(len(d.event_channels) for d in layouts)
    return (f"{len(layouts)} devices, both directions consistent, {rings} ring refs and {chans} event channels published, all Connected",
            text, {"devices": len(layouts), "ring_refs": rings, "event_channels": chans})


def xenstore_perms(ctx: Context):
    """From inside the guest: its own area is writable; dom0's and another domain's nodes are EACCES."""
    assert ctx.domid is not None  # set by guest.create, which this check needs
    with ctx.lab.ssh() as ssh:
        others = [d["id"] for d in parse_xl_list(ssh.check("xl list")) if d["id"] not in (0, ctx.domid)]
    other = others[0] if others else 0  # no other domU running: dom0 stands in as "another domain"
    checks = check_guest(ctx.guests, ctx.store(), ctx.guest, ctx.domid, other)
    text = "\n".join(f"{'ok  ' if c.passed else 'FAIL'} {c.what}: expected {c.expected}, got {c.got} {c.detail}".rstrip() for c in checks)
    failed = [c for c in checks if not c.passed]
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(checks)} wrong, first: {failed[0].what}: expected {failed[0].expected}, got {failed[0].got}", text)
    denied = sum(c.got == "EACCES" for c in checks)
    return (f"{len(checks)} requests from the guest as expected: own area read/write ok, {denied} refused with xenstored's EACCES (other domain: d{other})",
            text, {"requests": len(checks), "refused": denied, "other_domid": other})


def ring_io(ctx: Context):
    """Block and network ring I/O on the real frontends/backends (the dom0 I/O check)."""
    assert ctx.guests is not None  # set by guest.create, which this check needs
    out = []
    for r in ctx.guests.check(ctx.guest):
        out.append(Result(f"ring.{r['check']}", "SUCCESS" if r["ok"] else "FAILURE", r["seconds"], one_line(r["detail"], 400),
                          "" if r["ok"] else r["detail"], data={k: v for k, v in r.get("data", {}).items() if isinstance(v, (int, float, str))}))
    if not out:
        raise CheckFailed("the I/O check returned no results")
    return out


def evtchn_catalogue(ctx: Context):
    """Every event channel operation in dom0 and against the domU, read back via EVTCHNOP_status."""
    result = catalogue(ctx.lab, ctx.guest)
    checks = result["checks"]
    text = "\n".join(f"{'n/a ' if c.get('not_tried') else 'ok  ' if c['ok'] else 'FAIL'} {c['seed_op']:<45} {c['check']}"
                     + (f" ({c['not_tried']})" if c.get("not_tried") else "") for c in checks)
    failed = [c for c in checks if not c["ok"]]
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(checks)} failed, first: {failed[0]['seed_op']}: {failed[0]['check']} (got {failed[0].get('got', '')})", text)
    tried = [c for c in checks if not c.get("not_tried")]
    ops = len({c["seed_op"] for c in tried})
    not_tried = "".join(f"; not tried: {c['check']} ({c['not_tried']})" for c in checks if c.get("not_tried"))
    return (f"{len(tried)} checks covering {ops} operations/refusals, all read back as expected (dom0 and d{ctx.domid}){not_tried}",
            text, {"checks": len(tried), "operations": ops, "not_tried": len(checks) - len(tried)})


def evtchn_ping(ctx: Context):
    """Userspace round trips over an interdomain event channel, dom0 timing, the domU answering (placed as `xenlab evtchn ping`)."""
    result = ping(ctx.lab, ctx.guest, count=PING_COUNT)
    text = json.dumps(result, indent=1)
    placed = result.get("placement") or {}
    if result.get("count") != PING_COUNT or result.get("guest_answered", 0) < PING_COUNT:
        raise CheckFailed(f"{result.get('count')} of {PING_COUNT} round trips timed, the domU answered {result.get('guest_answered')}", text)
    if placed.get("not_restored"):
        raise CheckFailed(f"vCPU affinities not put back: {', '.join(placed['not_restored'])}", text)
    data = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return (f"{PING_COUNT} round trips dom0<->d{ctx.domid}: mean {result['mean_us']:.0f} us, p50 {result['p50_us']:.0f} us, "
            f"p99 {result['p99_us']:.0f} us ({placement_text(placed)}; put back after)"), text, data


def device_channel(ctx: Context):
    """The Python split driver: frontend in the domU, backend in dom0, checksummed echo both ways."""
    result = devchan(ctx.lab, ctx.guest, DEVCHAN_ARGS, devid=7)
    f, b = result["frontend"], result["backend"]
    text = json.dumps({"frontend": f, "backend": b}, indent=1, default=str)
    problems = []
    if b.get("ended") != "frontend-closed":
        problems.append(f"backend ended with {b.get('ended')}: {b.get('error', '')}")
    if b.get("bad_requests"):
        problems.append(f"{b['bad_requests']} bad requests")
    if f.get("requests") != b.get("requests") or f.get("bytes_out") != b.get("bytes_in") or f.get("bytes_in") != b.get("bytes_out"):
        problems.append(f"counts differ: frontend {f.get('requests')} req {f.get('bytes_out')}/{f.get('bytes_in')} B, "
                        f"backend {b.get('requests')} req {b.get('bytes_in')}/{b.get('bytes_out')} B")
    if b.get("mapped_after") or b.get("bound_after"):
        problems.append("the backend left grants mapped or the channel bound")
    if problems:
        raise CheckFailed("; ".join(problems), text)
    data = {"requests": f["requests"], "request_bytes": f["size"], "requests_per_s": f["requests_per_s"], "mb_per_s": f["mb_per_s"],
            "bytes_out": f.get("bytes_out"), "bytes_in": f.get("bytes_in")}
    return (f"{f['requests']} echo requests of {f['size']} B, {f['requests_per_s']:.0f} req/s, {f['mb_per_s']:.1f} MB/s; "
            f"backend {'->'.join(b['states'])}; nothing left mapped or bound"), text, data


def guest_destroy(ctx: Context):
    """xl destroy, traced; dom0 keeps no backend node, loop device or vif of the guest."""
    assert ctx.guests is not None  # set by guest.create, which this check needs
    with traced(ctx.store(), ctx.guest) as recorder:
        ctx.traces["destroy"] = recorder.timeline  # the live list: kept when the destroy fails half-way
        result = ctx.guests.destroy(ctx.guest)
        recorder.wait(settled(True), 15)
    ctx.timeline = list(recorder.timeline)
    ctx.created = None  # gone: cleanup has nothing left to do
    left = {k: v for k, v in result["leftovers"].items() if v}
    if "core_dir" in result:
        raise CheckFailed(f"the guest had crashed; its core is in {result['core_dir']} (`xenlab debug core-log DIR --panic`)")
    if left:
        raise CheckFailed(f"left behind in dom0: {left}")
    return (f"domid {result['domid']} destroyed in {result['seconds']:.1f} s; no backend node, loop device or vif left", "",
            {"domid": result["domid"], "destroy_seconds": result["seconds"]})


def trace_destroy(ctx: Context):
    """The teardown the trace saw is a clean forced teardown (domain destroyed)."""
    reports, text = _trace_verdict(ctx.timeline, "teardown")
    return (f"{len(ctx.timeline)} state changes, no violation; {', '.join(sorted({p for r in reports for p in r.phases}))}", text,
            {"state_changes": len(ctx.timeline), "devices": len(reports)})


def xen_tool_tests(ctx: Context):
    """Xen's own tool tests: every test-* program the lab's xen-utils ships, one
    result each (exit 0: SUCCESS). One that needs HVM paging on a CPU model
    without SVM is an allowed SKIP naming the model to use; any other exit is
    a FAILURE with the program's output."""
    with ctx.lab.ssh() as ssh:
        programs = ssh.check(f"ls -1 {XEN_TOOL_TESTS} 2>/dev/null || true").split()
        if not programs:
            raise CheckFailed(f"no {XEN_TOOL_TESTS} in dom0", "the dom0 image's xen-utils ships them; rebuild it with `xenlab build --force`")
        info = ctx.lab.info() or {}
        cpu = info.get("cpu") or ctx.lab.cfg.cpu  # what the running lab was booted with
        qemu = str((info.get("versions") or {}).get("qemu") or "")
        results = []
        for path in programs:
            name = f"xen.tools.{path.rsplit('/', 1)[-1]}"
            start = time.monotonic()
            run = ssh.run(f"timeout {TOOL_TEST_TIMEOUT} {path}", timeout=TOOL_TEST_TIMEOUT + 30)
            took = round(time.monotonic() - start, 2)
            output = (run.stdout + run.stderr).strip()
            last = one_line(output.splitlines()[-1] if output else "(no output)", 120)
            inner_skips = [line.strip() for line in output.splitlines() if line.strip().startswith("Skip")]
            if run.exit_status == 0:
                said = f"; skipped inside: {'; '.join(inner_skips)[:150]}" if inner_skips else ""
                results.append(Result(name, "SUCCESS", took, f"exit 0 in {took:.1f} s: {last}{said}", output[-3000:]))
            elif NO_HVM_PAGING.search(output) and cpu not in ("svm", "host"):
                results.append(Result(name, "SKIP", took, f"needs HVM paging, which the CPU model {cpu} lacks "
                                      f"(measured: {last}); use [lab] cpu = \"svm\"", output[-3000:], allowed=True))
            elif QEMU7_XBEGIN in output and qemu.startswith("7."):
                results.append(Result(name, "SKIP", took, f"QEMU {qemu}'s TCG runs XBEGIN without RTM in CPUID (measured: "
                                      f"\"{QEMU7_XBEGIN}\"), which QEMU 8+ fixes; run it on the backports QEMU", output[-3000:], allowed=True))
            else:
                state = "ERROR" if run.exit_status == 124 else "FAILURE"
                why = f"timed out after {TOOL_TEST_TIMEOUT} s" if run.exit_status == 124 else f"exit {run.exit_status}"
                results.append(Result(name, state, took, f"{why}: {last}", output[-3000:]))
    return results


def crash_scan(ctx: Context):
    """Nothing crashed during the run: no panic in the serial log, no domain in state 'c'."""
    crash = detect_crash(ctx)
    if crash:
        raise XenlabError(crash[0], crash[1])  # the runner turns it into CRASH with the tail
    with ctx.lab.ssh() as ssh:
        doms = parse_xl_list(ssh.check("xl list"))
    crashed = [d["name"] for d in doms if "c" in d["state"]]
    if crashed:
        raise CheckFailed(f"domains in crashed state: {', '.join(crashed)}")
    size = ctx.lab.serial_log.stat().st_size
    return (f"serial log ({size >> 10} KiB) has no Xen or dom0 panic; {len(doms)} domains, none crashed"
            + (f"; {ctx.lab_stalled}" if ctx.lab_stalled else "")), "", {"serial_log_bytes": size, "domains": len(doms)}


def cleanup(ctx: Context) -> None:
    """Destroy the guest if a check left it (best effort: the lab may be gone)."""
    try:
        if ctx.guests is not None and (ctx.created is not None or ctx.domid is None):
            if any(g["name"] == ctx.guest for g in ctx.guests.list()):
                ctx.log(f"  destroying guest {ctx.guest}")
                result = ctx.guests.destroy(ctx.guest)
                if "core_dir" in result:
                    ctx.log(f"  guest {ctx.guest} had crashed: its core is in {result['core_dir']} "
                            "(`xenlab debug core-log DIR --panic`)")
    except XenlabError as e:
        ctx.log(f"  could not destroy guest {ctx.guest}: {e.message}")
    finally:
        if ctx.guests is not None:
            ctx.guests.close()
        if ctx.xs is not None:
            ctx.xs.close()
