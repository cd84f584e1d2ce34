// SPDX-License-Identifier: GPL-2.0
/*
 * xlecho: an example Xen PV frontend driver for xenlab's device channel.
 *
 * Device type "xlchan" (the XenStore directory device/xlchan/<id>), served by
 * the backend written in Python that ships with xenlab (xenlab.agent.devchan,
 * started in dom0 by xenlab.evtchn.devchan). The split-driver handshake:
 *
 *   backend  InitWait    -> we share one ring page and DATA_PAGES data pages
 *                           (granted to the backend), allocate an event
 *                           channel, publish ring-ref, data-refs and
 *                           event-channel in one transaction, go Initialised
 *   backend  Connected   -> we go Connected and send `count` ECHO requests of
 *                           `size` bytes, each with the CRC-32 of its payload;
 *                           the backend answers with the payload reversed and
 *                           its CRC; we check both and log the result
 *   unbind               -> orderly closedown: we go Closing; the backend
 *                           unmaps our pages and goes Closing; we end our
 *                           grants, free everything and go Closed (xenbus
 *                           does it as the driver lets go); the backend Closed
 *
 * Wire format (16-byte entries, 128 slots on a 4 KiB ring page):
 *   request  u32 id, u8 op, u8 flags, u16 page, u32 len, u32 crc32(payload)
 *   response u32 id, u8 op, s8 status, u16 page, u32 len, u32 crc32(payload)
 * One data page per request in flight: `page` indexes data-refs.
 */
#include <linux/module.h>
#include <linux/slab.h>
#include <linux/wait.h>
#include <linux/workqueue.h>
#include <linux/interrupt.h>
#include <linux/delay.h>
#include <linux/jiffies.h>
#include <xen/xen.h>
#include <xen/xenbus.h>
#include <xen/events.h>
#include <xen/grant_table.h>
#include <xen/page.h>
#include <xen/interface/io/ring.h>

#define DATA_PAGES 32
#define OP_ECHO 1

struct xlecho_request {
	u32 id;
	u8 op;
	u8 flags;
	u16 page;
	u32 len;
	u32 crc;
} __packed;

struct xlecho_response {
	u32 id;
	u8 op;
	s8 status;
	u16 page;
	u32 len;
	u32 crc;
} __packed;

DEFINE_RING_TYPES(xlecho, struct xlecho_request, struct xlecho_response);

static unsigned int count = 1000;
module_param(count, uint, 0444);
MODULE_PARM_DESC(count, "echo requests to send once connected");
static unsigned int size = 2048;
module_param(size, uint, 0444);
MODULE_PARM_DESC(size, "payload bytes per request (1-4096)");

struct xlecho_info {
	struct xenbus_device *dev;
	void *pages;			/* ring page, then DATA_PAGES data pages */
	grant_ref_t refs[1 + DATA_PAGES];
	struct xlecho_front_ring ring;
	evtchn_port_t evtchn;
	int irq;
	wait_queue_head_t wq;
	struct work_struct work;
	bool connected;
	u32 sent[DATA_PAGES];		/* per data page: the request id using it, or ~0 */
	unsigned int ok, bad;
};

static u32 crc_table[256];

/* CRC-32 as zlib computes it (what the Python backend checks). */
static void crc_init(void)
{
	u32 i, j, c;

	for (i = 0; i < 256; i++) {
		for (c = i, j = 0; j < 8; j++)
			c = (c & 1) ? 0xEDB88320 ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

static u32 crc32_zlib(const u8 *p, size_t len)
{
	u32 c = ~0U;

	while (len--)
		c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
	return ~c;
}

static u8 *data_page(struct xlecho_info *info, unsigned int page)
{
	return (u8 *)info->pages + (1 + page) * XEN_PAGE_SIZE;
}

static void fill(u8 *buf, u32 id, unsigned int len)
{
	unsigned int i;

	for (i = 0; i < len; i++)
		buf[i] = (u8)(id * 31 + i * 7);
}

static bool check_echo(struct xlecho_info *info, const struct xlecho_response *rsp)
{
	u8 *buf = data_page(info, rsp->page);
	unsigned int i;

	if (rsp->status != 0 || rsp->len != size || crc32_zlib(buf, rsp->len) != rsp->crc)
		return false;
	for (i = 0; i < size; i++)	/* the backend echoes the payload reversed */
		if (buf[i] != (u8)(rsp->id * 31 + (size - 1 - i) * 7))
			return false;
	return true;
}

static irqreturn_t xlecho_interrupt(int irq, void *dev_id)
{
	struct xlecho_info *info = dev_id;

	wake_up(&info->wq);
	return IRQ_HANDLED;
}

/* Consume every response there is; the data pages they used become free. */
static unsigned int collect(struct xlecho_info *info)
{
	unsigned int done = 0;
	int more;

	do {
		RING_IDX i, rp = info->ring.sring->rsp_prod;

		virt_rmb();	/* read responses only after rsp_prod */
		for (i = info->ring.rsp_cons; i != rp; i++) {
			const struct xlecho_response *rsp = RING_GET_RESPONSE(&info->ring, i);

			if (rsp->page >= DATA_PAGES || info->sent[rsp->page] != rsp->id) {
				info->bad++;	/* a response we did not ask for */
				continue;
			}
			if (check_echo(info, rsp))
				info->ok++;
			else
				info->bad++;
			info->sent[rsp->page] = ~0U;
			done++;
		}
		info->ring.rsp_cons = rp;
		RING_FINAL_CHECK_FOR_RESPONSES(&info->ring, more);
	} while (more);
	return done;
}

static void xlecho_run(struct work_struct *work)
{
	struct xlecho_info *info = container_of(work, struct xlecho_info, work);
	unsigned int next = 0, answered = 0, page;
	unsigned long start = jiffies;
	int notify;

	while (answered < count && info->connected) {
		for (page = 0; page < DATA_PAGES && next < count && !RING_FULL(&info->ring); page++) {
			struct xlecho_request *req;

			if (info->sent[page] != ~0U)
				continue;
			fill(data_page(info, page), next, size);
			req = RING_GET_REQUEST(&info->ring, info->ring.req_prod_pvt);
			req->id = next;
			req->op = OP_ECHO;
			req->flags = 0;
			req->page = page;
			req->len = size;
			req->crc = crc32_zlib(data_page(info, page), size);
			info->sent[page] = next++;
			info->ring.req_prod_pvt++;
		}
		RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&info->ring, notify);
		if (notify)
			notify_remote_via_irq(info->irq);
		if (!wait_event_timeout(info->wq, RING_HAS_UNCONSUMED_RESPONSES(&info->ring) || !info->connected, 10 * HZ)) {
			dev_err(&info->dev->dev, "no response for 10 s (%u of %u answered)\n", answered, count);
			break;
		}
		answered += collect(info);
	}
	dev_info(&info->dev->dev, "xlecho: %u echo requests of %u bytes: %u ok, %u bad in %u ms\n",
		 answered, size, info->ok, info->bad, jiffies_to_msecs(jiffies - start));
}

static int xlecho_connect(struct xlecho_info *info)
{
	struct xenbus_device *dev = info->dev;
	struct xenbus_transaction xbt;
	struct xlecho_sring *sring;
	char *refs, *p;
	int err, i;

	err = xenbus_setup_ring(dev, GFP_KERNEL, &info->pages, 1 + DATA_PAGES, info->refs);
	if (err)
		return err;
	sring = info->pages;
	XEN_FRONT_RING_INIT(&info->ring, sring, XEN_PAGE_SIZE);
	sring->__pad[0] = 1;	/* the protocol's `alive` byte: the backend stops when it reads 0 */
	for (i = 0; i < DATA_PAGES; i++)
		info->sent[i] = ~0U;

	err = xenbus_alloc_evtchn(dev, &info->evtchn);
	if (err)
		return err;
	err = bind_evtchn_to_irqhandler(info->evtchn, xlecho_interrupt, 0, "xlecho", info);
	if (err < 0) {
		xenbus_free_evtchn(dev, info->evtchn);
		return err;
	}
	info->irq = err;

	refs = kzalloc(DATA_PAGES * 12, GFP_KERNEL);
	if (!refs)
		return -ENOMEM;
	for (p = refs, i = 1; i <= DATA_PAGES; i++)
		p += sprintf(p, i == 1 ? "%u" : " %u", info->refs[i]);
again:
	err = xenbus_transaction_start(&xbt);
	if (err)
		goto out;
	err = xenbus_printf(xbt, dev->nodename, "ring-ref", "%u", info->refs[0]) ?:
	      xenbus_printf(xbt, dev->nodename, "data-refs", "%s", refs) ?:
	      xenbus_printf(xbt, dev->nodename, "event-channel", "%u", info->evtchn);
	if (err) {
		xenbus_transaction_end(xbt, 1);
		goto out;
	}
	err = xenbus_transaction_end(xbt, 0);
	if (err == -EAGAIN)
		goto again;
out:
	kfree(refs);
	return err ?: xenbus_switch_state(dev, XenbusStateInitialised);
}

static void xlecho_disconnect(struct xlecho_info *info)
{
	info->connected = false;
	wake_up(&info->wq);
	cancel_work_sync(&info->work);
	if (info->irq > 0)
		unbind_from_irqhandler(info->irq, info);	/* also closes the event channel */
	info->irq = 0;
	if (info->pages)
		xenbus_teardown_ring(&info->pages, 1 + DATA_PAGES, info->refs);
}

static void xlecho_backend_changed(struct xenbus_device *dev, enum xenbus_state backend_state)
{
	struct xlecho_info *info = dev_get_drvdata(&dev->dev);
	int err;

	switch (backend_state) {
	case XenbusStateInitWait:
		if (dev->state != XenbusStateInitialising)
			break;
		err = xlecho_connect(info);
		if (err)
			xenbus_dev_fatal(dev, err, "setting up the ring");
		break;
	case XenbusStateConnected:
		if (dev->state != XenbusStateInitialised)
			break;
		xenbus_switch_state(dev, XenbusStateConnected);
		info->connected = true;
		schedule_work(&info->work);
		break;
	case XenbusStateClosing:	/* the backend began a closedown */
	case XenbusStateClosed:
		if (dev->state == XenbusStateClosed)
			break;
		xlecho_disconnect(info);
		xenbus_frontend_closed(dev);
		break;
	default:
		break;
	}
}

static int xlecho_probe(struct xenbus_device *dev, const struct xenbus_device_id *id)
{
	struct xlecho_info *info = kzalloc(sizeof(*info), GFP_KERNEL);

	if (!info)
		return -ENOMEM;
	info->dev = dev;
	init_waitqueue_head(&info->wq);
	INIT_WORK(&info->work, xlecho_run);
	dev_set_drvdata(&dev->dev, info);
	return 0;
}

/* Unbind: a frontend-initiated closedown, then free everything (xenbus sets Closed after). */
static void xlecho_remove(struct xenbus_device *dev)
{
	struct xlecho_info *info = dev_get_drvdata(&dev->dev);
	int waited;

	if (dev->state == XenbusStateConnected || dev->state == XenbusStateInitialised) {
		info->connected = false;
		cancel_work_sync(&info->work);
		xenbus_switch_state(dev, XenbusStateClosing);
		/* Its Closing says the backend unmapped our pages. The otherend
		 * watch is gone during remove: poll the backend's state. */
		for (waited = 0; waited < 300; waited++) {
			if (xenbus_read_driver_state(dev->otherend) >= XenbusStateClosing)
				break;
			msleep(100);
		}
	}
	xlecho_disconnect(info);
	kfree(info);
}

static const struct xenbus_device_id xlecho_ids[] = {
	{ "xlchan" },
	{ "" }
};

static struct xenbus_driver xlecho_driver = {
	.name = "xlecho",
	.ids = xlecho_ids,
	.probe = xlecho_probe,
	.remove = xlecho_remove,
	.otherend_changed = xlecho_backend_changed,
};

static int __init xlecho_init(void)
{
	if (!xen_domain())
		return -ENODEV;
	if (size < 1 || size > XEN_PAGE_SIZE)
		return -EINVAL;
	crc_init();
	return xenbus_register_frontend(&xlecho_driver);
}

static void __exit xlecho_exit(void)
{
	xenbus_unregister_driver(&xlecho_driver);
}

module_init(xlecho_init);
module_exit(xlecho_exit);
MODULE_DESCRIPTION("Example Xen PV frontend: checksummed echo over xenlab's device channel");
MODULE_LICENSE("GPL");
MODULE_ALIAS("xen:xlchan");
