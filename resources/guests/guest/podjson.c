/*
 * The pod-agent mode's JSON scanner; see include/podjson.h. Values are
 * located by skipping over their text, checking the structure (objects,
 * arrays, strings, bare words) on the way but not number syntax.
 */
#include "podjson.h"

static bool is_ws(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static size_t skip_ws(const char *s, size_t i, size_t n)
{
	while (i < n && is_ws(s[i]))
		i++;
	return i;
}

static bool is_word_char(char c)
{
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
	       c == '-' || c == '+' || c == '.';
}

/* Index just after the value starting at s[i], or 0 if it is malformed. */
static size_t skip_value(const char *s, size_t i, size_t n, int depth)
{
	if (i >= n || depth > JSON_MAX_DEPTH)
		return 0;
	char c = s[i];
	if (c == '"') {
		for (i++; i < n && s[i] != '"'; i++) {
			if (s[i] == '\\')
				i++;
		}
		return i < n ? i + 1 : 0;
	}
	if (c == '{' || c == '[') {
		char close = c == '{' ? '}' : ']';
		i = skip_ws(s, i + 1, n);
		if (i < n && s[i] == close)
			return i + 1;
		for (;;) {
			if (c == '{') {
				if (i >= n || s[i] != '"')
					return 0;
				i = skip_ws(s, skip_value(s, i, n, depth + 1), n);
				if (i == 0 || i >= n || s[i] != ':')
					return 0;
				i = skip_ws(s, i + 1, n);
			}
			i = skip_value(s, i, n, depth + 1);
			if (i == 0)
				return 0;
			i = skip_ws(s, i, n);
			if (i >= n)
				return 0;
			if (s[i] == close)
				return i + 1;
			if (s[i] != ',')
				return 0;
			i = skip_ws(s, i + 1, n);
		}
	}
	size_t start = i;
	while (i < n && is_word_char(s[i]))
		i++;
	return i > start ? i : 0;
}

/* Members (obj) or elements (array) of the container at s[0..n), in order. */
struct walk {
	const char *s;
	size_t n, i;
	char close;
};

static bool walk_start(struct walk *w, const char *s, size_t n, char open)
{
	size_t i = skip_ws(s, 0, n);

	/* The whole text must be one well-formed value. */
	if (i >= n || s[i] != open)
		return false;
	size_t end = skip_value(s, i, n, 0);
	if (end == 0 || skip_ws(s, end, n) != n)
		return false;
	w->s = s;
	w->n = end;
	w->i = skip_ws(s, i + 1, end);
	w->close = open == '{' ? '}' : ']';
	return true;
}

/* Next element (or member value, with its key in *key); false at the end. */
static bool walk_next(struct walk *w, struct json_span *key, struct json_span *val)
{
	const char *s = w->s;
	size_t i = w->i;

	if (s[i] == w->close)
		return false;
	if (key) {
		size_t k = skip_value(s, i, w->n, 1);
		key->p = s + i + 1;
		key->len = k - i - 2;
		i = skip_ws(s, skip_ws(s, k, w->n) + 1, w->n); /* past ':' */
	}
	size_t e = skip_value(s, i, w->n, 1);
	val->p = s + i;
	val->len = e - i;
	i = skip_ws(s, e, w->n);
	if (s[i] == ',')
		i = skip_ws(s, i + 1, w->n);
	w->i = i;
	return true;
}

bool json_get(const char *obj, size_t len, const char *key, struct json_span *val)
{
	struct walk w;
	struct json_span k;
	size_t klen = strlen(key);

	if (!walk_start(&w, obj, len, '{'))
		return false;
	while (walk_next(&w, &k, val)) {
		if (k.len == klen && memcmp(k.p, key, klen) == 0)
			return true;
	}
	return false;
}

bool json_index(const char *arr, size_t len, size_t idx, struct json_span *val)
{
	struct walk w;

	if (!walk_start(&w, arr, len, '['))
		return false;
	for (size_t i = 0; walk_next(&w, NULL, val); i++) {
		if (i == idx)
			return true;
	}
	return false;
}

bool json_string(struct json_span v, char *out, size_t size)
{
	if (v.len < 2 || v.p[0] != '"' || v.p[v.len - 1] != '"' || v.len - 2 >= size)
		return false;
	for (size_t i = 1; i + 1 < v.len; i++) {
		if (v.p[i] == '\\')
			return false;
	}
	memcpy(out, v.p + 1, v.len - 2);
	out[v.len - 2] = '\0';
	return true;
}

bool json_uint(struct json_span v, uint32_t *out)
{
	uint64_t x = 0;

	if (v.len == 0 || v.len > 10)
		return false;
	for (size_t i = 0; i < v.len; i++) {
		if (v.p[i] < '0' || v.p[i] > '9')
			return false;
		x = x * 10 + (uint64_t)(v.p[i] - '0');
	}
	if (x > 0xffffffffu)
		return false;
	*out = (uint32_t)x;
	return true;
}
