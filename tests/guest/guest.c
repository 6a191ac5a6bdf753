/* Tessera's freestanding test guest.
 *
 * It does what a guest driver does and reports on the serial port: finds the virtio-mmio
 * block device from the kernel command line (virtio_mmio.device=SIZE@ADDR:IRQ, as Linux
 * parses it), negotiates features, writes, flushes, reads back and checksums sectors,
 * discards, then powers off through the i8042 reset line. With "tessera.mode=evil" it
 * sends requests that lie (buffers outside memory, unknown types, sectors past the end)
 * and checks the device fails them and keeps working. With "tessera.mode=count" it
 * counts forever, printing progress (used by the snapshot tests; with
 * "tessera.tick_ms=N" a count every N ms of its LAPIC timer while it keeps busy, the fine
 * clock of bench/migrate.sh); "tessera.mode=idle" prints the same counts, one per LAPIC
 * timer tick, and halts in between (no host CPU while idle: what a cluster of many test
 * VMs needs).
 *
 * With "tessera.mode=net" it drives the virtio-net NIC instead (found among the
 * virtio_mmio.device= entries by its device id): it sends a gratuitous ARP for its address
 * ("tessera.ip=A.B.C.D", the MAC is the device's), then answers ARP requests for that
 * address and ICMP echo requests to it, printing one line per frame kind, and ignores
 * frames for other MACs (saying so). With "tessera.ping=A.B.C.D" it also pings that
 * address: ARP requests until it answers, then ICMP echo requests (one every 65536
 * polls) until 3 replies came, each reply printed ("TESSERA-GUEST: net: echo reply from ...").
 * Polled, no interrupts, like the disk. "tessera.mode=flood" sends tessera.frames=N
 * broadcast frames of tessera.frame_len=L bytes as fast as its ring allows (bench/net.sh).
 *
 * In the count, idle and echo modes it polls the power button's event register (the ACPI
 * Generic Event Device's port 0x600; it does not parse AML): on a press it says so on the
 * console and powers off, or with "tessera.power_button=ignore" says it ignores it.
 *
 * Guest instructions run emulated on our test machines (~1 M/s), so the work is small. */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

void *memset(void *d, int c, unsigned long n) { u8 *p = d; while (n--) *p++ = (u8)c; return d; }
void *memcpy(void *d, const void *s, unsigned long n) { u8 *p = d; const u8 *q = s; while (n--) *p++ = *q++; return d; }

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 rd(u64 a) { return *(volatile u32 *)a; }
static inline void wr(u64 a, u32 v) { *(volatile u32 *)a = v; }
#define barrier() __asm__ volatile("mfence" ::: "memory")

static void putc(char c) {
    for (int i = 0; i < 100000 && !(inb(0x3f8 + 5) & 0x20); i++) {}
    outb(0x3f8, (u8)c);
}
static void puts(const char *s) { while (*s) putc(*s++); }
static void puthex(u64 v) {
    puts("0x");
    for (int i = 60; i >= 0; i -= 4) putc("0123456789abcdef"[(v >> i) & 0xf]);
}
static void putdec(u64 v) {
    char b[21]; int n = 0;
    do { b[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) putc(b[--n]);
}
static void power_off(void) { outb(0x64, 0xfe); for (;;) __asm__ volatile("hlt"); }
static void fail(const char *why) { puts("TESSERA-GUEST: FAIL "); puts(why); puts("\n"); power_off(); }

/* ---- the power button (tessera-vmm's GED event register; a read clears it) ---- */
#define GED_PORT 0x600
#define GED_POWER_BUTTON 1
static int ignore_power_button;
static void poll_power_button(void) {
    if (!(inb(GED_PORT) & GED_POWER_BUTTON)) return;
    if (ignore_power_button) { puts("TESSERA-GUEST: power button pressed, ignored\n"); return; }
    puts("TESSERA-GUEST: power button pressed, shutting down\n");
    power_off();
}

/* ---- command line ---- */
static const char *find(const char *s, const char *key) {
    for (; *s; s++) {
        const char *a = s, *b = key;
        while (*b && *a == *b) { a++; b++; }
        if (!*b) return a;
    }
    return 0;
}
static u64 parse_num(const char **p) {
    const char *s = *p; u64 v = 0; int base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) { base = 16; s += 2; }
    for (;;) {
        char c = *s; int d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (base == 16 && c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (base == 16 && c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else break;
        v = v * (u64)base + (u64)d; s++;
    }
    if (*s == 'K' || *s == 'k') { v <<= 10; s++; } else if (*s == 'M' || *s == 'm') { v <<= 20; s++; }
    *p = s;
    return v;
}

/* ---- virtio-mmio ---- */
#define QSIZE 8
struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags; u16 idx; u16 ring[QSIZE]; u16 used_event; };
struct used_elem { u32 id; u32 len; };
struct used { u16 flags; u16 idx; struct used_elem ring[QSIZE]; u16 avail_event; };

static struct desc descs[QSIZE] __attribute__((aligned(16)));
static struct avail avail __attribute__((aligned(2)));
/* The used ring alone on its page: only the device writes there, so the page is dirtied
 * by the VMM and never by the guest (what the dirty-page test relies on). */
static union { struct used u; u8 page[4096]; } used_page __attribute__((aligned(4096)));
#define used (used_page.u)
static struct { u32 type; u32 reserved; u64 sector; } hdr;
static volatile u8 status;
static u8 buf[4096] __attribute__((aligned(4096)));
static u64 base;
static u64 features;
static u16 last_used;

enum { T_IN = 0, T_OUT = 1, T_FLUSH = 4, T_GET_ID = 8, T_DISCARD = 11, T_WRITE_ZEROES = 13 };

static void virtio_init(void) {
    if (rd(base + 0x00) != 0x74726976) fail("no virtio magic at the address from the command line");
    if (rd(base + 0x04) != 2) fail("not virtio-mmio version 2");
    if (rd(base + 0x08) != 2) fail("not a block device");
    wr(base + 0x70, 0);
    wr(base + 0x70, 1);
    wr(base + 0x70, 1 | 2);
    wr(base + 0x14, 0); u64 lo = rd(base + 0x10);
    wr(base + 0x14, 1); u64 hi = rd(base + 0x10);
    u64 offered = lo | (hi << 32);
    if (!(offered & (1ull << 32))) fail("VERSION_1 not offered");
    features = offered & ((1ull << 32) | (1ull << 9) | (1ull << 13) | (1ull << 14));
    wr(base + 0x24, 0); wr(base + 0x20, (u32)features);
    wr(base + 0x24, 1); wr(base + 0x20, (u32)(features >> 32));
    wr(base + 0x70, 1 | 2 | 8);
    if (!(rd(base + 0x70) & 8)) fail("FEATURES_OK refused");
    wr(base + 0x30, 0);
    if (rd(base + 0x34) < QSIZE) fail("queue too small");
    wr(base + 0x38, QSIZE);
    wr(base + 0x80, (u32)(u64)descs); wr(base + 0x84, (u32)((u64)descs >> 32));
    wr(base + 0x90, (u32)(u64)&avail); wr(base + 0x94, (u32)((u64)&avail >> 32));
    wr(base + 0xa0, (u32)(u64)&used); wr(base + 0xa4, (u32)((u64)&used >> 32));
    wr(base + 0x44, 1);
    wr(base + 0x70, 1 | 2 | 4 | 8);
    puts("virtio-blk ready, features "); puthex(features);
    puts(", capacity "); putdec(rd(base + 0x100) | ((u64)rd(base + 0x104) << 32)); puts(" sectors\n");
}

/* Sends one request: header, optional data (device-writable when `in`), status.
 * Returns the status byte, or 0xee when the device never wrote it. */
static int request(u32 type, u64 sector, u64 data, u32 len, int in) {
    hdr.type = type; hdr.reserved = 0; hdr.sector = sector;
    status = 0xee;
    int n = 0;
    descs[n].addr = (u64)&hdr; descs[n].len = 16; descs[n].flags = 1; descs[n].next = 1; n++;
    if (len) {
        descs[n].addr = data; descs[n].len = len; descs[n].flags = 1 | (in ? 2 : 0); descs[n].next = 2; n++;
    }
    descs[n].addr = (u64)&status; descs[n].len = 1; descs[n].flags = 2; descs[n].next = 0;
    avail.ring[avail.idx % QSIZE] = 0;
    barrier();
    avail.idx++;
    barrier();
    wr(base + 0x50, 0);
    for (u64 spin = 0; ; spin++) {
        barrier();
        if (*(volatile u16 *)&used.idx != last_used) break;
        if (spin > 5000000ull) fail("request never completed");
    }
    last_used++;
    return status;
}

static u8 pattern(u64 sector, u32 i) { return (u8)(sector * 131 + i * 7 + (i >> 9)); }

static void mode_disk(void) {
    static const u64 sectors[] = { 0, 8, 64, 2048 };
    u64 checksum = 0;
    if (request(T_GET_ID, 0, (u64)buf, 20, 1) != 0) fail("GET_ID");
    buf[20] = 0; puts("disk id: "); puts((const char *)buf); puts("\n");
    for (int k = 0; k < 4; k++) {
        for (u32 i = 0; i < 4096; i++) buf[i] = pattern(sectors[k], i);
        if (request(T_OUT, sectors[k], (u64)buf, 4096, 0) != 0) fail("write");
    }
    if (features & (1ull << 9)) {
        if (request(T_FLUSH, 0, 0, 0, 0) != 0) fail("flush");
    }
    for (int k = 0; k < 4; k++) {
        memset(buf, 0, sizeof buf);
        if (request(T_IN, sectors[k], (u64)buf, 4096, 1) != 0) fail("read");
        for (u32 i = 0; i < 4096; i++) {
            if (buf[i] != pattern(sectors[k], i)) fail("read back different data");
            checksum = checksum * 31 + buf[i];
        }
    }
    int discards = 0;
    if (features & (1ull << 13)) {
        struct { u64 sector; u32 num; u32 flags; } seg = { 64, 8, 0 };
        memcpy(buf, &seg, sizeof seg);
        if (request(T_DISCARD, 0, (u64)buf, 16, 0) != 0) fail("discard");
        if (request(T_IN, 64, (u64)buf, 4096, 1) != 0) fail("read after discard");
        for (u32 i = 0; i < 4096; i++) if (buf[i]) fail("discarded sectors are not zero");
        discards = 1;
    }
    puts("TESSERA-GUEST: PASS writes=4 reads=4 discards="); putdec((u64)discards);
    puts(" checksum="); puthex(checksum); puts("\n");
}

static void mode_evil(void) {
    int st;
    /* A data buffer far outside guest memory. */
    st = request(T_OUT, 0, 0x7fff00000000ull, 4096, 0);
    if (st == 0) fail("write from outside guest memory succeeded");
    /* An unknown request type. */
    st = request(99, 0, 0, 0, 0);
    if (st != 2) fail("unknown request type not UNSUPP");
    /* A sector past the end of the disk. */
    u64 cap = rd(base + 0x100) | ((u64)rd(base + 0x104) << 32);
    st = request(T_IN, cap, (u64)buf, 512, 1);
    if (st != 1) fail("read past the end not IOERR");
    /* A length that is not whole sectors. */
    st = request(T_OUT, 0, (u64)buf, 100, 0);
    if (st != 1) fail("partial-sector write not IOERR");
    /* The device still works after all that. */
    for (u32 i = 0; i < 512; i++) buf[i] = 0x42;
    if (request(T_OUT, 1, (u64)buf, 512, 0) != 0) fail("good write after bad ones");
    puts("TESSERA-GUEST: PASS evil requests refused, device alive\n");
}

/* Counts forever. With a disk: first says what sector 1 holds when an earlier run left
 * a count there ("TESSERA-GUEST: disk holds COUNT=<k>", so a VM moved to another node
 * proves it reads what it wrote before), writes a marker to sector 0, then every fifth
 * count writes "COUNT=<k>" to sector 1, so a restored VM proves its disk still works. */
static void count_begin(int disk) {
    puts("used ring page "); puthex((u64)&used_page); puts(", buffer page "); puthex((u64)buf); puts("\n");
    if (!disk) return;
    memset(buf, 0, 512);
    if (request(T_IN, 1, (u64)buf, 512, 1) != 0) fail("count read");
    if (buf[0] == 'C' && buf[1] == 'O' && buf[2] == 'U' && buf[3] == 'N' && buf[4] == 'T' && buf[5] == '=') {
        buf[40] = 0;
        puts("TESSERA-GUEST: disk holds "); puts((const char *)buf); puts("\n");
    }
    memset(buf, 0, 512);
    memcpy(buf, "TESSERA-MARK-BEFORE-SNAPSHOT", 28);
    if (request(T_OUT, 0, (u64)buf, 512, 0) != 0) fail("marker write");
    if ((features & (1ull << 9)) && request(T_FLUSH, 0, 0, 0, 0) != 0) fail("flush");
}

/* One count: the power button first (a port read is a VM exit, costly under emulation:
 * once per count), then "count <k>", and every fifth count "COUNT=<k>" to the disk. */
static void count_step(u64 k, int disk) {
    poll_power_button();
    puts("count "); putdec(k); puts("\n");
    if (disk && k % 5 == 0) {
        memset(buf, 0, 512);
        memcpy(buf, "COUNT=", 6);
        char d[21]; int m = 0; u64 v = k;
        do { d[m++] = (char)('0' + v % 10); v /= 10; } while (v);
        for (int i = 0; i < m; i++) buf[6 + i] = (u8)d[m - 1 - i];
        if (request(T_OUT, 1, (u64)buf, 512, 0) != 0) fail("count write");
    }
}

/* ---- tessera.mode=idle: the same counts, but the guest halts between them ----
 * The LAPIC timer (periodic, tessera.tick_ms=N, default 1000) wakes it; everything else
 * is masked: LINT0 (the PIC, through which virtio's and the power button's interrupts
 * would come) and the I/O APIC's pins (masked from reset, never unmasked). The disk is
 * polled as in the other modes, with interrupts off; the power button is polled once
 * per tick. An idle guest costs its host nothing between ticks: HLT stays in KVM (the
 * in-kernel irqchip) until the timer fires. */
#define LAPIC 0xfee00000ull
#define TICK_VECTOR 0x20
volatile u64 ticks; /* raised by tick_isr (entry.S) */
void tick_isr(void);
void other_isr(void);
void exception_isr(void);
void guest_exception(void) { fail("an exception in a ticking mode"); }

struct gate { u16 off0, sel; u8 ist, type; u16 off1; u32 off2, zero; };
static struct gate idt[256] __attribute__((aligned(16)));
static void gate(int v, void (*h)(void)) {
    u64 a = (u64)h;
    /* Selector 0x08: the VMM's 64-bit code segment; 0x8e: present interrupt gate. */
    idt[v] = (struct gate){ (u16)a, 0x08, 0, 0x8e, (u16)(a >> 16), (u32)(a >> 32), 0 };
}

/* The periodic LAPIC timer at tessera.tick_ms (default `dflt`; 0 when neither is given),
 * raising `ticks` through tick_isr; interrupts stay off until the caller enables them. */
static u64 start_ticks(const char *cmdline, u64 dflt) {
    u64 tick_ms = dflt;
    const char *t = find(cmdline, "tessera.tick_ms=");
    if (t) tick_ms = parse_num(&t);
    if (!t && !dflt) return 0;
    if (tick_ms < 1 || tick_ms > 60000) fail("tessera.tick_ms= must be 1 to 60000");
    for (int v = 0; v < 256; v++) gate(v, v < 32 ? exception_isr : other_isr);
    gate(TICK_VECTOR, tick_isr);
    struct { u16 limit; u64 base; } __attribute__((packed)) d = { sizeof idt - 1, (u64)idt };
    __asm__ volatile("lidt %0" : : "m"(d));
    wr(LAPIC + 0xf0, 0x100 | 0xff);                 /* enabled, spurious vector 0xff */
    wr(LAPIC + 0x350, 1u << 16);                    /* LINT0 masked */
    wr(LAPIC + 0x3e0, 0x3);                         /* divide by 16 */
    wr(LAPIC + 0x320, (1u << 17) | TICK_VECTOR);    /* periodic */
    /* KVM's LAPIC timer counts at 1 GHz (its APIC bus default): 62,500 per ms at /16. */
    wr(LAPIC + 0x380, (u32)(tick_ms * 62500));
    return tick_ms;
}

static void mode_idle(int disk, const char *cmdline) {
    u64 tick_ms = start_ticks(cmdline, 1000);
    puts("TESSERA-GUEST: idle mode, a count every "); putdec(tick_ms); puts(" ms, halting in between\n");
    count_begin(disk);
    count_step(0, disk);
    u64 seen = 0, k = 0;
    for (;;) {
        /* STI's one-instruction shadow: no tick can slip in between it and HLT. */
        __asm__ volatile("sti; hlt; cli" : : : "memory");
        if (ticks == seen) continue;
        seen = ticks;
        count_step(++k, disk);
    }
}

/* tessera.mode=count: a count every 20,000 turns of a busy loop. The vCPU never rests:
 * a whole host CPU per guest on machines without VT-x. With tessera.tick_ms=N the busy
 * loop goes on the same way, but a count is printed on every LAPIC timer tick instead
 * (interrupts on; a tick that comes while a count is printed is folded into the next),
 * so a gap in the counts measures the time the guest did not run to about N ms, where
 * the turns of the loop, emulated at a varying pace, gave ~100 ms (bench/migrate.sh). */
static void mode_count(int disk, const char *cmdline) {
    u64 tick_ms = start_ticks(cmdline, 0);
    if (tick_ms) {
        puts("TESSERA-GUEST: busy mode, a count every "); putdec(tick_ms); puts(" ms\n");
    }
    count_begin(disk);
    if (!tick_ms) {
        for (u64 n = 0; ; n++)
            if (n % 20000 == 0) count_step(n / 20000, disk);
    }
    count_step(0, disk);
    __asm__ volatile("sti" : : : "memory");
    u64 seen = 0, k = 0;
    for (volatile u64 n = 0; ; n++) {
        if (ticks == seen) continue;
        seen = ticks;
        count_step(++k, disk);
    }
}

/* ---- ACPI: find and check the tables a multi-vCPU VM gets, count the processors ---- */
static u64 rd64(const u8 *p) { u64 v; memcpy(&v, p, 8); return v; }
static u32 rd32p(const u8 *p) { u32 v; memcpy(&v, p, 4); return v; }
static u8 sum(const u8 *p, u32 n) { u8 s = 0; while (n--) s = (u8)(s + *p++); return s; }
static int sig(const u8 *p, const char *s) { for (int i = 0; s[i]; i++) if (p[i] != (u8)s[i]) return 0; return 1; }

static void mode_acpi(void) {
    const u8 *rsdp = 0;
    for (u64 a = 0xe0000; a < 0x100000; a += 16)
        if (sig((const u8 *)a, "RSD PTR ")) { rsdp = (const u8 *)a; break; }
    if (!rsdp) fail("no RSDP in 0xE0000-0xFFFFF");
    if (sum(rsdp, 20) || sum(rsdp, 36)) fail("RSDP checksum");
    const u8 *xsdt = (const u8 *)rd64(rsdp + 24);
    u32 xlen = rd32p(xsdt + 4);
    if (!sig(xsdt, "XSDT") || sum(xsdt, xlen)) fail("XSDT");
    int cpus = 0, hw_reduced = 0, dsdt = 0, ged = 0;
    for (u32 off = 36; off + 8 <= xlen; off += 8) {
        const u8 *t = (const u8 *)rd64(xsdt + off);
        u32 len = rd32p(t + 4);
        if (sum(t, len)) fail("table checksum");
        if (sig(t, "APIC")) {
            for (u32 o = 44; o + 2 <= len; o += t[o + 1]) {
                if (t[o + 1] < 2) fail("bad MADT entry length");
                if (t[o] == 0 && (rd32p(t + o + 4) & 1)) cpus++;
            }
        }
        if (sig(t, "FACP")) {
            if (rd32p(t + 112) & (1u << 20)) hw_reduced = 1;
            const u8 *d = (const u8 *)rd64(t + 140);
            if (sig(d, "DSDT") && !sum(d, rd32p(d + 4))) {
                dsdt = 1;
                for (u32 o = 36; o + 8 <= rd32p(d + 4); o++) if (sig(d + o, "ACPI0013")) ged = 1;
            }
        }
    }
    puts("TESSERA-GUEST: ACPI cpus="); putdec((u64)cpus);
    puts(" hw_reduced="); putdec((u64)hw_reduced);
    puts(" dsdt="); putdec((u64)dsdt);
    puts(" ged="); putdec((u64)ged); puts("\n");
    power_off();
}

/* Echo mode: reads the serial port (polling the line status register) and echoes each
 * line back in upper case, so tests can type through the control API. */
static void mode_echo(void) {
    puts("echo ready\n");
    char line[80]; int n = 0;
    for (u32 spins = 0; ; spins++) {
        if (spins % 256 == 0) poll_power_button();
        if (!(inb(0x3f8 + 5) & 1)) continue;
        char c = (char)inb(0x3f8);
        if (c == '\r' || c == '\n') {
            line[n] = 0;
            puts("echo: ");
            for (int i = 0; i < n; i++) putc(line[i] >= 'a' && line[i] <= 'z' ? (char)(line[i] - 32) : line[i]);
            puts("\n");
            if (n == 3 && line[0] == 'b' && line[1] == 'y' && line[2] == 'e') power_off();
            n = 0;
        } else if (n < 79) {
            line[n++] = c;
        }
    }
}

/* ---- finding devices: every virtio_mmio.device=SIZE@ADDR:IRQ entry, by device id ---- */
static u64 find_device(const char *cmdline, u32 id) {
    const char *s = cmdline;
    while ((s = find(s, "virtio_mmio.device="))) {
        const char *p = s;
        u64 size = parse_num(&p);
        if (*p++ != '@') fail("bad virtio_mmio.device syntax");
        u64 a = parse_num(&p);
        if (size < 0x200 || !a) fail("bad virtio_mmio.device values");
        if (rd(a + 0x00) == 0x74726976 && rd(a + 0x08) == id) return a;
        s = p;
    }
    return 0;
}

/* ---- virtio-net: receive queue 0, transmit queue 1, 12-byte header ---- */
#define VNET_HDR 12
#define RXBUF 2048
static struct desc rxd[QSIZE] __attribute__((aligned(16)));
static struct avail rxa __attribute__((aligned(2)));
/* `used` names the disk's ring (a macro), so the NIC's rings have their own type. */
struct nused { u16 flags; u16 idx; struct used_elem ring[QSIZE]; u16 avail_event; };
static struct nused rxu __attribute__((aligned(4)));
static struct desc txd[QSIZE] __attribute__((aligned(16)));
static struct avail txa __attribute__((aligned(2)));
static struct nused txu __attribute__((aligned(4)));
static u8 rxbuf[QSIZE][RXBUF] __attribute__((aligned(64)));
static u8 txbuf[RXBUF] __attribute__((aligned(64)));
static u64 nbase;
static u16 rx_last, tx_last;
static u8 mac[6], myip[4];
/* tessera.ping=IP: the peer this guest pings (ARP, then ICMP echo requests). */
static u8 peer[4], peer_mac[6];
static int pinging, peer_known;
static u16 echo_seq, echo_replies;

static void putip(const u8 *ip) { for (int i = 0; i < 4; i++) { if (i) putc('.'); putdec(ip[i]); } }
static void putmac(const u8 *m) {
    for (int i = 0; i < 6; i++) { if (i) putc(':'); putc("0123456789abcdef"[m[i] >> 4]); putc("0123456789abcdef"[m[i] & 15]); }
}
static int same(const u8 *a, const u8 *b, int n) { while (n--) if (*a++ != *b++) return 0; return 1; }
static u16 be16(const u8 *p) { return (u16)((p[0] << 8) | p[1]); }
static void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static u16 csum(const u8 *p, u32 n) {
    u32 s = 0;
    for (u32 i = 0; i + 1 < n; i += 2) s += (u32)be16(p + i);
    if (n & 1) s += (u32)p[n - 1] << 8;
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    return (u16)~s;
}

static void queue_setup(u32 q, struct desc *d, struct avail *a, struct nused *u) {
    wr(nbase + 0x30, q);
    if (rd(nbase + 0x34) < QSIZE) fail("net queue too small");
    wr(nbase + 0x38, QSIZE);
    wr(nbase + 0x80, (u32)(u64)d); wr(nbase + 0x84, (u32)((u64)d >> 32));
    wr(nbase + 0x90, (u32)(u64)a); wr(nbase + 0x94, (u32)((u64)a >> 32));
    wr(nbase + 0xa0, (u32)(u64)u); wr(nbase + 0xa4, (u32)((u64)u >> 32));
    wr(nbase + 0x44, 1);
}

static void net_init(void) {
    if (rd(nbase + 0x04) != 2) fail("net: not virtio-mmio version 2");
    wr(nbase + 0x70, 0);
    wr(nbase + 0x70, 1);
    wr(nbase + 0x70, 1 | 2);
    wr(nbase + 0x14, 0); u64 lo = rd(nbase + 0x10);
    wr(nbase + 0x14, 1); u64 hi = rd(nbase + 0x10);
    u64 offered = lo | (hi << 32);
    if (!(offered & (1ull << 32))) fail("net: VERSION_1 not offered");
    if (!(offered & (1ull << 5))) fail("net: MAC not offered");
    u64 f = (1ull << 32) | (1ull << 5);
    wr(nbase + 0x24, 0); wr(nbase + 0x20, (u32)f);
    wr(nbase + 0x24, 1); wr(nbase + 0x20, (u32)(f >> 32));
    wr(nbase + 0x70, 1 | 2 | 8);
    if (!(rd(nbase + 0x70) & 8)) fail("net: FEATURES_OK refused");
    queue_setup(0, rxd, &rxa, &rxu);
    queue_setup(1, txd, &txa, &txu);
    wr(nbase + 0x70, 1 | 2 | 4 | 8);
    for (int i = 0; i < 6; i++) mac[i] = *(volatile u8 *)(nbase + 0x100 + (u64)i);
    for (u16 i = 0; i < QSIZE; i++) {
        rxd[i].addr = (u64)rxbuf[i]; rxd[i].len = RXBUF; rxd[i].flags = 2; rxd[i].next = 0;
        rxa.ring[i] = i;
    }
    barrier();
    rxa.idx = QSIZE;
    barrier();
    wr(nbase + 0x50, 0);
}

/* Sends the frame in txbuf + VNET_HDR (len bytes, padded to the Ethernet minimum). */
static void net_send(u32 len) {
    if (len < 60) { memset(txbuf + VNET_HDR + len, 0, 60 - len); len = 60; }
    memset(txbuf, 0, VNET_HDR);
    txd[0].addr = (u64)txbuf; txd[0].len = VNET_HDR + len; txd[0].flags = 0; txd[0].next = 0;
    txa.ring[txa.idx % QSIZE] = 0;
    barrier();
    txa.idx++;
    barrier();
    wr(nbase + 0x50, 1);
    for (u64 spin = 0; ; spin++) {
        barrier();
        if (*(volatile u16 *)&txu.idx != tx_last) break;
        if (spin > 5000000ull) fail("net: transmit never completed");
    }
    tx_last++;
}

static void arp(u16 op, const u8 *dst_mac, const u8 *tha, const u8 *tpa) {
    u8 *f = txbuf + VNET_HDR;
    memcpy(f, dst_mac, 6); memcpy(f + 6, mac, 6); put16(f + 12, 0x0806);
    u8 *a = f + 14;
    put16(a, 1); put16(a + 2, 0x0800); a[4] = 6; a[5] = 4; put16(a + 6, op);
    memcpy(a + 8, mac, 6); memcpy(a + 14, myip, 4); memcpy(a + 18, tha, 6); memcpy(a + 24, tpa, 4);
    net_send(42);
}

static void net_frame(const u8 *f, u32 len) {
    static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    if (len < 14) return;
    if (!same(f, mac, 6)) {
        if (!(f[0] & 1)) {
            puts("TESSERA-GUEST: net: frame for another MAC ("); putmac(f); puts(") ignored\n");
        }
        if (!same(f, bcast, 6)) return;
    }
    u16 type = be16(f + 12);
    const u8 *p = f + 14;
    if (type == 0x0806 && len >= 42 && be16(p + 6) == 1 && same(p + 24, myip, 4)) {
        puts("TESSERA-GUEST: net: ARP request for me from "); putip(p + 14); puts(", replied\n");
        u8 sha[6], spa[4];
        memcpy(sha, p + 8, 6); memcpy(spa, p + 14, 4);
        arp(2, sha, sha, spa);
        return;
    }
    if (type == 0x0806 && len >= 42 && be16(p + 6) == 2 && pinging && same(p + 14, peer, 4)
        && same(p + 24, myip, 4) && !peer_known) {
        memcpy(peer_mac, p + 8, 6);
        peer_known = 1;
        puts("TESSERA-GUEST: net: ARP reply: "); putip(peer); puts(" is at "); putmac(peer_mac); puts("\n");
        return;
    }
    if (type != 0x0800 || len < 34 || (p[0] >> 4) != 4 || p[9] != 1 || !same(p + 16, myip, 4)) return;
    u32 ihl = (u32)(p[0] & 15) * 4, total = be16(p + 2);
    if (ihl < 20 || total < ihl + 8 || 14 + total > len || total > RXBUF - VNET_HDR - 14) return;
    const u8 *icmp = p + ihl;
    if (icmp[0] == 0 && pinging && same(p + 12, peer, 4) && be16(icmp + 4) == 0x7e55) {
        echo_replies++;
        puts("TESSERA-GUEST: net: echo reply from "); putip(p + 12);
        puts(" seq="); putdec(be16(icmp + 6)); puts(" (reply "); putdec(echo_replies); puts(")\n");
        return;
    }
    if (icmp[0] != 8) return;
    puts("TESSERA-GUEST: net: ICMP echo request from "); putip(p + 12);
    puts(" seq="); putdec(be16(icmp + 6)); puts(", replied\n");
    u8 *r = txbuf + VNET_HDR;
    memcpy(r, f + 6, 6); memcpy(r + 6, mac, 6); put16(r + 12, 0x0800);
    u8 *ip = r + 14;
    memcpy(ip, p, total);
    memcpy(ip + 12, myip, 4); memcpy(ip + 16, p + 12, 4);
    ip[8] = 64; put16(ip + 10, 0); put16(ip + 10, csum(ip, ihl));
    u8 *ic = ip + ihl;
    ic[0] = 0; put16(ic + 2, 0); put16(ic + 2, csum(ic, total - ihl));
    net_send(14 + total);
}

/* Pings the peer: an ARP request until it answers, then one echo request per call. */
static void ping_step(void) {
    static const u8 zero[6], bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    if (!peer_known) { arp(1, bcast, zero, peer); return; }
    u8 *f = txbuf + VNET_HDR;
    memcpy(f, peer_mac, 6); memcpy(f + 6, mac, 6); put16(f + 12, 0x0800);
    u8 *ip = f + 14;
    u32 total = 20 + 8 + 16;
    memset(ip, 0, total);
    ip[0] = 0x45; put16(ip + 2, (u16)total); put16(ip + 4, echo_seq); ip[8] = 64; ip[9] = 1;
    memcpy(ip + 12, myip, 4); memcpy(ip + 16, peer, 4);
    put16(ip + 10, csum(ip, 20));
    u8 *ic = ip + 20;
    ic[0] = 8; put16(ic + 4, 0x7e55); put16(ic + 6, echo_seq);
    for (int i = 0; i < 16; i++) ic[8 + i] = (u8)('a' + i);
    put16(ic + 2, csum(ic, 8 + 16));
    puts("TESSERA-GUEST: net: echo request to "); putip(peer); puts(" seq="); putdec(echo_seq); puts("\n");
    echo_seq++;
    net_send(14 + total);
}

static void mode_net(const char *cmdline) {
    nbase = find_device(cmdline, 1);
    if (!nbase) fail("no virtio_mmio.device= of a network device on the command line");
    const char *ip = find(cmdline, "tessera.ip=");
    if (!ip) fail("no tessera.ip= on the command line");
    for (int i = 0; i < 4; i++) {
        u64 v = parse_num(&ip);
        if (v > 255 || (i < 3 && *ip++ != '.')) fail("bad tessera.ip=");
        myip[i] = (u8)v;
    }
    const char *pp = find(cmdline, "tessera.ping=");
    if (pp) {
        for (int i = 0; i < 4; i++) {
            u64 v = parse_num(&pp);
            if (v > 255 || (i < 3 && *pp++ != '.')) fail("bad tessera.ping=");
            peer[i] = (u8)v;
        }
        pinging = 1;
    }
    net_init();
    static const u8 zero[6], bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    arp(1, bcast, zero, myip);
    puts("TESSERA-GUEST: net up mac="); putmac(mac); puts(" ip="); putip(myip);
    puts(", sent gratuitous ARP\n");
    for (u64 spins = 0; ; spins++) {
        if (spins % 65536 == 0) poll_power_button();
        /* Until 3 replies came: one ARP or echo request every 65536 polls (a few
         * seconds apart on the development machines' emulated CPU). */
        if (pinging && echo_replies < 3 && spins % 65536 == 32768) ping_step();
        barrier();
        if (*(volatile u16 *)&rxu.idx == rx_last) continue;
        struct used_elem e = rxu.ring[rx_last % QSIZE];
        rx_last++;
        if (e.id < QSIZE && e.len >= VNET_HDR && e.len <= RXBUF)
            net_frame(rxbuf[e.id] + VNET_HDR, e.len - VNET_HDR);
        /* The buffer goes back to the device. */
        rxa.ring[rxa.idx % QSIZE] = (u16)(e.id % QSIZE);
        barrier();
        rxa.idx++;
        barrier();
        wr(nbase + 0x50, 0);
    }
}

/* tessera.mode=flood: N copies of one broadcast frame (EtherType 0x88b5, local
 * experimental), timed from outside on the tap's counters. Every descriptor points at the
 * same read-only frame, so the ring is refilled without touching the frame: the guest's
 * work per frame is a few instructions (they run emulated here), and one notification
 * per refill of half the ring or more keeps the exits per frame low. */
static void mode_flood(const char *cmdline) {
    nbase = find_device(cmdline, 1);
    if (!nbase) fail("no virtio_mmio.device= of a network device on the command line");
    u64 n = 100000, len = 60;
    const char *p = find(cmdline, "tessera.frames=");
    if (p) n = parse_num(&p);
    p = find(cmdline, "tessera.frame_len=");
    if (p) len = parse_num(&p);
    if (len < 60 || len > 1514) fail("tessera.frame_len= must be 60 to 1514");
    net_init();
    u8 *f = txbuf + VNET_HDR;
    memset(txbuf, 0, VNET_HDR + len);
    memset(f, 0xff, 6); memcpy(f + 6, mac, 6); put16(f + 12, 0x88b5);
    for (u16 i = 0; i < QSIZE; i++) { txd[i].addr = (u64)txbuf; txd[i].len = VNET_HDR + (u32)len; txd[i].flags = 0; txd[i].next = 0; }
    puts("TESSERA-GUEST: flood of "); putdec(n); puts(" frames of "); putdec(len); puts(" bytes\n");
    u64 queued = 0, done = 0;
    for (u64 spin = 0; done < n; spin++) {
        barrier();
        u16 u = *(volatile u16 *)&txu.idx;
        if (u != tx_last) { done += (u16)(u - tx_last); tx_last = u; spin = 0; }
        u64 room = QSIZE - (queued - done);
        if (queued < n && room >= QSIZE / 2) {
            u16 a = txa.idx;
            for (; room && queued < n; room--, queued++, a++) txa.ring[a % QSIZE] = (u16)(a % QSIZE);
            barrier();
            txa.idx = a;
            barrier();
            wr(nbase + 0x50, 1);
        }
        if (spin > 5000000ull) fail("net: transmit never completed");
    }
    puts("TESSERA-GUEST: flood done, "); putdec(done); puts(" frames sent\n");
}

/* Benchmarks, timed from outside through the marker port 0x441. */
static void mode_bench(void) {
    outb(0x441, 1);
    for (int i = 0; i < 2000; i++) {
        if (request(T_IN, (u64)(i % 256) * 8, (u64)buf, 4096, 1) != 0) fail("bench read");
    }
    outb(0x441, 2);
    for (int i = 0; i < 2000; i++) outb(0x80, 0);
    outb(0x441, 3);
    puts("TESSERA-GUEST: BENCH reads=2000 exits=2000\n");
}

void guest_main(u8 *boot_params) {
    puts("tessera test guest\n");
    const char *cmdline = (const char *)(u64)*(u32 *)(boot_params + 0x228);
    ignore_power_button = find(cmdline, "tessera.power_button=ignore") != 0;
    if (find(cmdline, "tessera.mode=acpi")) mode_acpi();
    if (find(cmdline, "tessera.mode=echo")) mode_echo();
    int counting = find(cmdline, "tessera.mode=count") != 0;
    int idle = find(cmdline, "tessera.mode=idle") != 0;
    if (find(cmdline, "tessera.mode=net")) mode_net(cmdline);
    if (find(cmdline, "tessera.mode=flood")) { mode_flood(cmdline); power_off(); }
    base = find_device(cmdline, 2);
    if (!base && counting) mode_count(0, cmdline);
    if (!base && idle) mode_idle(0, cmdline);
    if (!base) fail("no virtio_mmio.device= of a block device on the command line");
    virtio_init();
    if (counting) mode_count(1, cmdline);
    if (idle) mode_idle(1, cmdline);
    if (find(cmdline, "tessera.mode=bench")) { mode_bench(); power_off(); }
    if (find(cmdline, "tessera.mode=evil")) mode_evil();
    else mode_disk();
    power_off();
}
