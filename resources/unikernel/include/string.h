/* <string.h> of the ember unikernel runtime: everything is declared in <ember.h>. */
#ifndef EMBER_SHIM_STRING_H
#define EMBER_SHIM_STRING_H
#include <ember.h>
#endif
