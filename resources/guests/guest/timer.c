/*
 * A free-running millisecond clock for poll timeouts, independent of how
 * fast the (possibly emulated) CPU is: PIT channel 2 counts down from 65536
 * at 1.193182 MHz (mode 2, gate on through port 0x61, speaker off); every
 * read adds the ticks elapsed since the previous one. Callers must read it
 * at least every ~50 ms (a wrap), which polling loops do.
 *
 * Started on first use, so modes without virtio never touch the PIT.
 * If the counter does not move (no PIT), a synthetic clock advances 1 ms
 * per 16 reads so loops still end.
 */
#include "virtio.h"

#define PIT_CH2 0x42
#define PIT_CMD 0x43
#define PORT_B 0x61
#define PIT_HZ 1193182u

static bool timer_ok;
static uint16_t last;
static uint64_t ticks;
static uint64_t fake_reads;

static uint16_t pit_read(void)
{
	outb(PIT_CMD, 0x80); /* latch channel 2 */
	uint8_t lo = inb(PIT_CH2);
	uint8_t hi = inb(PIT_CH2);
	return (uint16_t)(hi << 8 | lo);
}

static bool timer_started;

void timer_init(void)
{
	if (timer_started)
		return;
	timer_started = true;
	outb(PORT_B, (uint8_t)((inb(PORT_B) & ~0x02) | 0x01));
	outb(PIT_CMD, 0xb4); /* channel 2, lo/hi byte, mode 2, binary */
	outb(PIT_CH2, 0);
	outb(PIT_CH2, 0); /* reload 65536 */
	last = pit_read();
	for (int i = 0; i < 64 && !timer_ok; i++) {
		busy_delay(200);
		timer_ok = pit_read() != last;
	}
	last = pit_read();
	ticks = 0;
}

uint64_t timer_ms(void)
{
	if (!timer_started)
		timer_init();
	if (!timer_ok)
		return ++fake_reads / 16;
	uint16_t now = pit_read();
	ticks += (uint16_t)(last - now);
	last = now;
	return ticks * 1000 / PIT_HZ;
}
