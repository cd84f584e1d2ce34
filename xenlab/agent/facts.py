"""Facts about the lab, written once: where things live in dom0 and in a
domU, the lab's addresses, XenBus state numbers and the patterns that mean a
guest crashed. Standard library only: the agent imports this inside the lab
and the host-side library imports it as xenlab.agent.facts."""

from __future__ import annotations

import re

# The Xen each Debian suite ships as dom0's, and its tools' versioned directory
# (/usr/lib/xen-4.17/bin on bookworm), which the image build links to one path.
XEN_VERSIONS = {"bookworm": "4.17", "trixie": "4.20"}
XEN_BIN = "/usr/local/lib/xen/bin"
DOM0_PATH = f"/usr/sbin:/usr/bin:/sbin:/bin:{XEN_BIN}"
XEN_TOOL_TESTS = f"{XEN_BIN}/test-*"  # Xen's own tool tests, as xen-utils ships them
# What they print when Xen can build no HVM/PVH domain (a CPU model without SVM/VMX):
NO_HVM_PAGING = re.compile(r"neither HAP nor Shadow|Neither HAP or SHADOW", re.IGNORECASE)
# test-tsx on QEMU 7.2's TCG: XBEGIN runs (and aborts) although CPUID offers no RTM,
# where a CPU without RTM raises #UD; QEMU 8 and later raise it.
QEMU7_XBEGIN = "Host reports no RTM, but appears available"

# The agent package: in dom0 copied over SSH, in a python domU baked into its root.
AGENT_PACKAGE = "xenlab_agent"
DOM0_AGENT_ROOT = "/usr/local/lib/xenlab"
DOMU_AGENT_ROOT = "/usr/lib/xenlab"
HOTPLUG_DIR = f"{DOM0_AGENT_ROOT}/hotplug"

# The guest roots xenlab builds, and the kernels it builds them for (a guest
# may also boot the path of a kernel file of the user's).
ROOTS = ("busybox", "python")
KERNELS = ("minimal", "debian")

# dom0's per-guest locks (create-NAME.lock holds the create's pid): one create,
# one console request at a time.
LOCK_DIR = "/run/xenlab"

# The agent server in dom0 (agent/server.py): its port on dom0's 127.0.0.1 only,
# and AGENT_RUNNING_DIR/PID ("MODULE ARGS") for each request while it runs.
AGENT_SERVER_PORT = 7017
AGENT_RUNNING_DIR = f"{LOCK_DIR}/agents"

# Guest files in dom0: shipped kernels and roots, and one directory per guest.
IMAGES_DIR = "/var/lib/xenlab/images"
GUESTS_DIR = "/var/lib/xenlab/guests"
ATTACHED_DIR = "attached"  # in a guest's directory: disks attached after create (blkback.py)
PY_BLOCK_BACKEND = "pyblk"  # backend type of the Python block backend: kernel blkback serves only "vbd"
CORES_DIR = "/var/lib/xenlab/cores"  # `xl dump-core` files until the host fetched them
CONSOLE_LOG = "/var/log/xen/console/guest-{name}.log"

# Networks: QEMU's user network outside dom0, and dom0's bridge for guests (no uplink).
NETWORK = {"nic": "eth0", "dom0_ip": "10.0.2.15", "gateway": "10.0.2.2", "bridge": "xenbr0", "bridge_ip": "10.99.0.1"}
BRIDGE = NETWORK["bridge"]
DOM0_BRIDGE_IP = NETWORK["bridge_ip"]
# The device kind each stock frontend module drives: with the module kept
# off (--no-stock), a guest's devices of that kind wait in InitWait for a
# frontend of the user's, and `guest create` does not wait for them.
STOCK_FRONTEND_KINDS = {"xen_blkfront": "vbd", "xen_netfront": "vif"}
STOCK_BACKEND_KINDS = {"xen_blkback": ("vbd",), "xen_netback": ("vif",)}  # dom0's kernel backends xenlab can swap
GUEST_SUBNET = DOM0_BRIDGE_IP.rsplit(".", 1)[0]  # guests get GUEST_SUBNET.10 and up

# XenBus states (xen/include/public/io/xenbus.h).
UNKNOWN, INITIALISING, INITWAIT, INITIALISED, CONNECTED, CLOSING, CLOSED, RECONFIGURING, RECONFIGURED = range(9)
STATE_NAMES = ("Unknown", "Initialising", "InitWait", "Initialised", "Connected", "Closing", "Closed", "Reconfiguring", "Reconfigured")


def state_name(state: int | str | None) -> str:
    """'Connected' for 4 or '4'; '(removed)' for None; 'state N' for what xenbus.h does not name."""
    if state is None:
        return "(removed)"
    if isinstance(state, str):
        if not state.isdigit():
            return state
        state = int(state)
    return STATE_NAMES[state] if 0 <= state < len(STATE_NAMES) else f"state {state}"


# The console exec protocol (xenlab's exec agent in the guest, domctl in dom0):
# REQUEST id script stdin, answered by REPLY id rc stdout stderr END, fields base64.
EXEC_REQUEST_TAG, EXEC_REPLY_TAG, EXEC_END_TAG = "XLX1", "XLR1", "XLE1"
EXEC_CHUNK_TAG = "XLO1"  # a piece of a running command's output
EXEC_CHUNK_BYTES = 12288  # at most, per piece (one pipe read in the guest)
# A guest whose ready line ends with this takes a request's input after the
# line, "+LEN" in its place (LEN bytes of base64), read in blocks: busybox's
# `read` takes a line one byte (one syscall, a Xen round trip) at a time.
EXEC_FRAMED_INPUT = "exec=2"

# Lines on a guest's console: its init says it is ready, or that it panicked.
GUEST_READY_MARK = "XENLAB-GUEST-READY"
GUEST_PANIC_MARK = "XENLAB-GUEST-PANIC"
# Xen's line when an HVM/PVH vCPU triple-faults: "d27v0 Triple fault - invoking HVM shutdown action 1".
XEN_TRIPLE_FAULT = "Triple fault - invoking HVM shutdown action"
KERNEL_PANIC = "Kernel panic - not syncing"  # Linux's panic() line, in dom0's and guests' logs
# Linux's lines for an oops that did not panic (the guest runs on, the task
# that oopsed killed): an extended regex, for grep -E in a guest and re in Python.
KERNEL_OOPS = r"Oops: [0-9a-f]{4}|BUG: kernel NULL pointer|BUG: unable to handle|general protection fault|kernel BUG at"
GUEST_PANIC_PATTERNS = (re.compile(re.escape(KERNEL_PANIC) + ".*"), re.compile(GUEST_PANIC_MARK + r": .*"))
