/* <assert.h> of the ember unikernel runtime. */
#ifndef EMBER_SHIM_ASSERT_H
#define EMBER_SHIM_ASSERT_H
#include <ember.h>

void __ember_assert_fail(const char *expr, const char *file, int line)
	__attribute__((noreturn));

#ifdef NDEBUG
#define assert(x) ((void)0)
#else
#define assert(x) ((x) ? (void)0 : __ember_assert_fail(#x, __FILE__, __LINE__))
#endif
#endif
