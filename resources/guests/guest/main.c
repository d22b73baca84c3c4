/* C entry of the ember test guest, called by the assembly entry points. */
#include "bootinfo.h"

void __attribute__((noreturn)) ember_main(uint32_t proto, uint64_t info_paddr);

void ember_main(uint32_t proto, uint64_t info_paddr)
{
	static struct bootinfo bi;

	serial_init();
	bootinfo_parse(&bi, (int)proto, info_paddr);
	if (!bi.info_valid)
		guest_log("warning: no valid boot information at 0x%llx",
			  (unsigned long long)info_paddr);
	run_test(&bi);
}
