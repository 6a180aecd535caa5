/* spin N: 2*N instructions in a loop (dec, jnz), for vm.py --icount's check that the guest's
 * clock counts instructions (bench/lsmguard/metaguest.py: spin 0 and spin N timed). */
#include <stdlib.h>

int main(int argc, char **argv)
{
	unsigned long n = argc > 1 ? strtoul(argv[1], NULL, 10) : 0;

	if (n)
		__asm__ volatile("1: dec %0\n\tjnz 1b" : "+r"(n));
	return 0;
}
