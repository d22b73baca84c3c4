/*
 * A tiny JSON scanner for the pod-agent mode (podjson.c): no parse tree,
 * just "the text of the value of key K in this object" and "element i of
 * this array". Strings with escapes are not decoded (json_string refuses
 * them). Pure code, also built for the host tests.
 */
#ifndef EMBER_PODJSON_H
#define EMBER_PODJSON_H

#include "ember.h"

/* The text of one JSON value (a string keeps its quotes). */
struct json_span {
	const char *p;
	size_t len;
};

/* Nesting deeper than this is refused as malformed. */
#define JSON_MAX_DEPTH 16

/*
 * The value of the first member named key of the object whose text is
 * obj[0..len) (leading/trailing whitespace allowed). False if obj is not a
 * well-formed object or has no such member.
 */
bool json_get(const char *obj, size_t len, const char *key, struct json_span *val);
/* Element idx of the array whose text is arr[0..len); false if absent. */
bool json_index(const char *arr, size_t len, size_t idx, struct json_span *val);
/*
 * Copies the contents of a string value into out (NUL-terminated). False
 * if v is not a string, contains a backslash escape or does not fit.
 */
bool json_string(struct json_span v, char *out, size_t size);
/* A non-negative integer value (digits only) up to 0xffffffff. */
bool json_uint(struct json_span v, uint32_t *out);

#endif
