/*
 * warren.h: write Warren RPC handlers in C (guest side of Warren ABI v1, see ../ABI.md).
 *
 * Header-only: include it from one or more .c files and build a WASI reactor, e.g.
 *
 *   clang --target=wasm32-wasi -mexec-model=reactor -O2 -o hello.wasm hello.c
 *
 * (Debian: apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32.)
 *
 *   #include "warren.h"
 *
 *   WARREN_METHOD(echo) {                       // exported as "rpc:echo": the method "echo"
 *       warren_str value;
 *       if (!warren_json_get(warren_args(), "value", &value))
 *           return warren_error("InvalidArgs", "missing field: value", NULL);
 *       return warren_output_str(value);         // the value's JSON text, as it arrived
 *   }
 *
 * Everything is `static inline` except the `warren_abi_version` export, which is a weak
 * definition so that several translation units may include this header.
 *
 * Strings: all JSON is UTF-8 text given as (pointer, length), never NUL-terminated by the host.
 * `warren_str` is such a slice. The JSON helpers are deliberately small: they find a key of an
 * object and read integers and strings, which is what a handler needs to read its args; they
 * trust that their input is valid JSON (the host guarantees it for args and context).
 */
#ifndef WARREN_H
#define WARREN_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------- */
/* The raw ABI: imports from module "warren_v1" (ABI.md, "Imports").                          */

#define WARREN_ABI_VERSION 1

#define WARREN_IMPORT_(name) __attribute__((import_module("warren_v1"), import_name(name)))

WARREN_IMPORT_("input_len") int32_t warren_raw_input_len(void);
WARREN_IMPORT_("input_read") void warren_raw_input_read(void *dst);
WARREN_IMPORT_("context_len") int32_t warren_raw_context_len(void);
WARREN_IMPORT_("context_read") void warren_raw_context_read(void *dst);
WARREN_IMPORT_("output_write") void warren_raw_output_write(const void *src, int32_t len);
WARREN_IMPORT_("error_write") void warren_raw_error_write(const void *src, int32_t len);
WARREN_IMPORT_("log") void warren_raw_log(int32_t level, const void *src, int32_t len);
WARREN_IMPORT_("call") int32_t warren_raw_call(const void *src, int32_t len);
WARREN_IMPORT_("cast") int32_t warren_raw_cast(const void *src, int32_t len);
WARREN_IMPORT_("fanout_cast") int32_t warren_raw_fanout_cast(const void *src, int32_t len);
WARREN_IMPORT_("notify") int32_t warren_raw_notify(const void *src, int32_t len);
WARREN_IMPORT_("reply_len") int32_t warren_raw_reply_len(void);
WARREN_IMPORT_("reply_read") void warren_raw_reply_read(void *dst);

/* The ABI marker the host checks at load time. Weak, so several .c files may include this. */
__attribute__((weak, export_name("warren_abi_version"))) int32_t warren_abi_version(void) {
    return WARREN_ABI_VERSION;
}

/* Method status codes. */
#define WARREN_OK 0
#define WARREN_FAILED 1

/*
 * WARREN_METHOD(name) { ... } defines the RPC method `name`, exported as "rpc:name" (ABI.md,
 * "Which exports are methods"). The C symbol is warren_method_<name>, so a method called `read`
 * or `write` never replaces libc's. Return WARREN_OK, or the value of warren_error(...).
 */
#define WARREN_METHOD(name)                                                                   \
    __attribute__((export_name("rpc:" #name))) int32_t warren_method_##name(void);            \
    int32_t warren_method_##name(void)

/* For method names that are not C identifiers: WARREN_EXPORT_AS("admin.reset") int32_t f(void). */
#define WARREN_EXPORT_AS(method) __attribute__((export_name("rpc:" method)))

/* Log levels for warren_log (ABI.md: 0 trace .. 4 error). */
enum warren_level {
    WARREN_TRACE = 0,
    WARREN_DEBUG = 1,
    WARREN_INFO = 2,
    WARREN_WARN = 3,
    WARREN_ERROR = 4,
};

/* A slice of UTF-8 (usually JSON) text. */
typedef struct {
    const char *ptr;
    size_t len;
} warren_str;

static inline warren_str warren_str_of(const char *cstr) {
    warren_str s = {cstr, cstr ? strlen(cstr) : 0};
    return s;
}

/* ---------------------------------------------------------------------------------------- */
/* Reading the args and the context.                                                          */

/* Copy the args JSON into buf if it fits (cap bytes); returns its length either way, like
 * snprintf. A result > cap means nothing was copied. No NUL is written. */
static inline size_t warren_args_read(char *buf, size_t cap) {
    size_t len = (size_t)(uint32_t)warren_raw_input_len();
    if (len <= cap)
        warren_raw_input_read(buf);
    return len;
}

/* As warren_args_read, for the request context (a JSON object, "{}" when empty). */
static inline size_t warren_context_read(char *buf, size_t cap) {
    size_t len = (size_t)(uint32_t)warren_raw_context_len();
    if (len <= cap)
        warren_raw_context_read(buf);
    return len;
}

/* Read with one of the raw pairs into a malloc'd, NUL-terminated buffer (kept for the rest of
 * the invocation: the instance is dropped afterwards anyway). */
static inline warren_str warren_read_all_(int32_t (*len_fn)(void), void (*read_fn)(void *)) {
    size_t len = (size_t)(uint32_t)len_fn();
    char *buf = (char *)malloc(len + 1);
    if (!buf) {
        warren_str empty = {"{}", 2};
        return empty;
    }
    read_fn(buf);
    buf[len] = '\0';
    warren_str s = {buf, len};
    return s;
}

/* The args JSON object, read once per invocation (NUL-terminated for convenience). */
static inline warren_str warren_args(void) {
    static warren_str cached;
    static bool read;
    if (!read) {
        cached = warren_read_all_(warren_raw_input_len, warren_raw_input_read);
        read = true;
    }
    return cached;
}

/* The request context JSON object, read once per invocation. */
static inline warren_str warren_context(void) {
    static warren_str cached;
    static bool read;
    if (!read) {
        cached = warren_read_all_(warren_raw_context_len, warren_raw_context_read);
        read = true;
    }
    return cached;
}

/* ---------------------------------------------------------------------------------------- */
/* Outbound RPC (ABI.md, "Outbound RPC"): `request` is the request JSON, e.g.
 *   {"topic": "calc", "method": "add", "args": {"a": 1, "b": 2}}
 * Returns WARREN_OK with the result JSON (`null` except for a call) in *reply, or WARREN_FAILED
 * with the error JSON ({"class", "message", "data"}) in *reply, which can be passed on with
 * warren_error_json(). *reply is malloc'd and NUL-terminated. Only topics the handler's config
 * grants (`call`, `cast`, `notify`) are reachable.                                           */

static inline int32_t warren_send_(int32_t (*send)(const void *, int32_t), const char *request,
                                   size_t n, warren_str *reply) {
    int32_t status = send(request, (int32_t)n);
    warren_str r = warren_read_all_(warren_raw_reply_len, warren_raw_reply_read);
    if (reply) *reply = r;
    return status == 0 ? WARREN_OK : WARREN_FAILED;
}

static inline int32_t warren_call(const char *request, size_t n, warren_str *reply) {
    return warren_send_(warren_raw_call, request, n, reply);
}
static inline int32_t warren_cast(const char *request, size_t n, warren_str *reply) {
    return warren_send_(warren_raw_cast, request, n, reply);
}
static inline int32_t warren_fanout_cast(const char *request, size_t n, warren_str *reply) {
    return warren_send_(warren_raw_fanout_cast, request, n, reply);
}
static inline int32_t warren_notify(const char *request, size_t n, warren_str *reply) {
    return warren_send_(warren_raw_notify, request, n, reply);
}

/* ---------------------------------------------------------------------------------------- */
/* Minimal JSON reading: values are slices of their raw text.                                 */

enum warren_json_type {
    WARREN_JSON_INVALID = 0,
    WARREN_JSON_NULL,
    WARREN_JSON_BOOL,
    WARREN_JSON_NUMBER,
    WARREN_JSON_STRING,
    WARREN_JSON_ARRAY,
    WARREN_JSON_OBJECT,
};

static inline size_t warren_json_ws_(const char *s, size_t len, size_t i) {
    while (i < len && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r'))
        i++;
    return i;
}

/* The index just past the string starting at s[i] == '"', or 0 if it is not terminated. */
static inline size_t warren_json_string_end_(const char *s, size_t len, size_t i) {
    for (i++; i < len; i++) {
        if (s[i] == '\\')
            i++;
        else if (s[i] == '"')
            return i + 1;
    }
    return 0;
}

/* The index just past the value starting at s[i] (after whitespace), or 0 on malformed text. */
static inline size_t warren_json_value_end_(const char *s, size_t len, size_t i) {
    i = warren_json_ws_(s, len, i);
    if (i >= len)
        return 0;
    if (s[i] == '"')
        return warren_json_string_end_(s, len, i);
    if (s[i] == '{' || s[i] == '[') {
        size_t depth = 0;
        for (; i < len; i++) {
            char c = s[i];
            if (c == '"') {
                size_t end = warren_json_string_end_(s, len, i);
                if (!end)
                    return 0;
                i = end - 1;
            } else if (c == '{' || c == '[') {
                depth++;
            } else if (c == '}' || c == ']') {
                if (--depth == 0)
                    return i + 1;
            }
        }
        return 0;
    }
    /* number, true, false, null */
    size_t start = i;
    while (i < len && s[i] != ',' && s[i] != '}' && s[i] != ']' && s[i] != ' ' &&
           s[i] != '\t' && s[i] != '\n' && s[i] != '\r')
        i++;
    return i > start ? i : 0;
}

/* The slice with surrounding whitespace removed. */
static inline warren_str warren_json_trim(warren_str v) {
    size_t i = warren_json_ws_(v.ptr, v.len, 0);
    size_t end = v.len;
    while (end > i && (v.ptr[end - 1] == ' ' || v.ptr[end - 1] == '\t' ||
                       v.ptr[end - 1] == '\n' || v.ptr[end - 1] == '\r'))
        end--;
    warren_str t = {v.ptr + i, end - i};
    return t;
}

/* What kind of JSON value v is (by its first character). */
static inline enum warren_json_type warren_json_type(warren_str v) {
    v = warren_json_trim(v);
    if (v.len == 0)
        return WARREN_JSON_INVALID;
    switch (v.ptr[0]) {
    case 'n': return WARREN_JSON_NULL;
    case 't':
    case 'f': return WARREN_JSON_BOOL;
    case '"': return WARREN_JSON_STRING;
    case '[': return WARREN_JSON_ARRAY;
    case '{': return WARREN_JSON_OBJECT;
    default:
        return (v.ptr[0] == '-' || (v.ptr[0] >= '0' && v.ptr[0] <= '9')) ? WARREN_JSON_NUMBER
                                                                          : WARREN_JSON_INVALID;
    }
}

/* Encode code point cp as UTF-8 into out (at least 4 bytes); returns the byte count. */
static inline size_t warren_utf8_(uint32_t cp, char *out) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

static inline int32_t warren_hex4_(const char *s, size_t len, size_t i) {
    if (i + 4 > len)
        return -1;
    int32_t v = 0;
    for (size_t k = 0; k < 4; k++) {
        char c = s[i + k];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= c - '0';
        else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
        else return -1;
    }
    return v;
}

/*
 * Decode the JSON string v (its raw text, quotes included) into dst as UTF-8, writing at most
 * cap bytes and no NUL. Returns the decoded length (which may exceed cap: then dst holds a
 * prefix), or -1 if v is not a string. Lone surrogates become U+FFFD.
 */
static inline long warren_json_unescape(warren_str v, char *dst, size_t cap) {
    v = warren_json_trim(v);
    if (v.len < 2 || v.ptr[0] != '"' || v.ptr[v.len - 1] != '"')
        return -1;
    const char *s = v.ptr;
    size_t end = v.len - 1, n = 0;
    char tmp[4];
    for (size_t i = 1; i < end;) {
        size_t w;
        if (s[i] != '\\') {
            tmp[0] = s[i++];
            w = 1;
        } else {
            if (i + 1 >= end)
                return -1;
            char e = s[i + 1];
            i += 2;
            switch (e) {
            case '"': tmp[0] = '"'; w = 1; break;
            case '\\': tmp[0] = '\\'; w = 1; break;
            case '/': tmp[0] = '/'; w = 1; break;
            case 'b': tmp[0] = '\b'; w = 1; break;
            case 'f': tmp[0] = '\f'; w = 1; break;
            case 'n': tmp[0] = '\n'; w = 1; break;
            case 'r': tmp[0] = '\r'; w = 1; break;
            case 't': tmp[0] = '\t'; w = 1; break;
            case 'u': {
                int32_t cp = warren_hex4_(s, end, i);
                if (cp < 0)
                    return -1;
                i += 4;
                if (cp >= 0xD800 && cp <= 0xDBFF && i + 6 <= end && s[i] == '\\' &&
                    s[i + 1] == 'u') {
                    int32_t lo = warren_hex4_(s, end, i + 2);
                    if (lo >= 0xDC00 && lo <= 0xDFFF) {
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        i += 6;
                    }
                }
                if (cp >= 0xD800 && cp <= 0xDFFF)
                    cp = 0xFFFD;
                w = warren_utf8_((uint32_t)cp, tmp);
                break;
            }
            default: return -1;
            }
        }
        for (size_t k = 0; k < w; k++, n++)
            if (n < cap)
                dst[n] = tmp[k];
    }
    return (long)n;
}

/* Whether the JSON string v equals the UTF-8 text key (klen bytes). */
static inline bool warren_json_string_eq_(warren_str v, const char *key, size_t klen) {
    char small[128];
    long n = warren_json_unescape(v, small, sizeof small);
    if (n < 0 || (size_t)n != klen)
        return false;
    if ((size_t)n <= sizeof small)
        return memcmp(small, key, klen) == 0;
    char *big = (char *)malloc((size_t)n);
    if (!big)
        return false;
    warren_json_unescape(v, big, (size_t)n);
    bool eq = memcmp(big, key, klen) == 0;
    free(big);
    return eq;
}

/*
 * Find the top-level key `key` of the JSON object obj and set *out to its value's raw text.
 * Returns false if obj is not an object or has no such key. With duplicate keys the last one
 * wins (as in Python and JavaScript).
 */
static inline bool warren_json_get(warren_str obj, const char *key, warren_str *out) {
    const char *s = obj.ptr;
    size_t len = obj.len, klen = strlen(key);
    size_t i = warren_json_ws_(s, len, 0);
    bool found = false;
    if (i >= len || s[i] != '{')
        return false;
    i = warren_json_ws_(s, len, i + 1);
    if (i < len && s[i] == '}')
        return false;
    while (i < len) {
        if (s[i] != '"')
            return found;
        size_t kend = warren_json_string_end_(s, len, i);
        if (!kend)
            return found;
        warren_str k = {s + i, kend - i};
        i = warren_json_ws_(s, len, kend);
        if (i >= len || s[i] != ':')
            return found;
        size_t vstart = warren_json_ws_(s, len, i + 1);
        size_t vend = warren_json_value_end_(s, len, vstart);
        if (!vend)
            return found;
        if (warren_json_string_eq_(k, key, klen)) {
            out->ptr = s + vstart;
            out->len = vend - vstart;
            found = true;
        }
        i = warren_json_ws_(s, len, vend);
        if (i >= len || s[i] != ',')
            return found;
        i = warren_json_ws_(s, len, i + 1);
    }
    return found;
}

/*
 * Read v as an integer: true only for a JSON number without fraction or exponent that fits in
 * int64_t ("3" yes; "3.0", "1e3", "\"3\"", "true" no).
 */
static inline bool warren_json_int(warren_str v, int64_t *out) {
    v = warren_json_trim(v);
    size_t i = 0;
    bool neg = false;
    if (i < v.len && v.ptr[i] == '-') {
        neg = true;
        i++;
    }
    if (i >= v.len)
        return false;
    uint64_t mag = 0, limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
    for (; i < v.len; i++) {
        char c = v.ptr[i];
        if (c < '0' || c > '9')
            return false;
        uint64_t d = (uint64_t)(c - '0');
        if (mag > (limit - d) / 10)
            return false;
        mag = mag * 10 + d;
    }
    *out = neg ? (int64_t)(0 - mag) : (int64_t)mag;
    return true;
}

/*
 * Read v as a string into buf (cap bytes, NUL-terminated, truncated to fit). Returns the
 * decoded length (> cap - 1 means it was truncated), or -1 if v is not a string.
 */
static inline long warren_json_string(warren_str v, char *buf, size_t cap) {
    if (cap == 0)
        return warren_json_unescape(v, buf, 0);
    long n = warren_json_unescape(v, buf, cap - 1);
    if (n >= 0)
        buf[(size_t)n < cap - 1 ? (size_t)n : cap - 1] = '\0';
    else
        buf[0] = '\0';
    return n;
}

/* ---------------------------------------------------------------------------------------- */
/* Minimal JSON writing: a growable buffer.                                                   */

typedef struct {
    char *ptr;
    size_t len, cap;
    bool oom; /* an allocation failed: the content is incomplete */
} warren_buf;

#define WARREN_BUF_INIT {NULL, 0, 0, false}

static inline bool warren_buf_reserve_(warren_buf *b, size_t more) {
    if (b->oom)
        return false;
    if (b->len + more <= b->cap)
        return true;
    size_t cap = b->cap ? b->cap * 2 : 64;
    while (cap < b->len + more)
        cap *= 2;
    char *p = (char *)realloc(b->ptr, cap);
    if (!p) {
        b->oom = true;
        return false;
    }
    b->ptr = p;
    b->cap = cap;
    return true;
}

/* Append raw text (already JSON, or a part of it). */
static inline void warren_buf_raw(warren_buf *b, const char *s, size_t n) {
    if (n && warren_buf_reserve_(b, n)) {
        memcpy(b->ptr + b->len, s, n);
        b->len += n;
    }
}

static inline void warren_buf_cstr(warren_buf *b, const char *s) { warren_buf_raw(b, s, strlen(s)); }

/* Append the UTF-8 text s (n bytes) JSON-escaped, without quotes. */
static inline void warren_buf_escaped(warren_buf *b, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[6] = {'\\', 0, 0, 0, 0, 0};
        size_t w = 2;
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        default:
            if (c < 0x20) {
                esc[1] = 'u';
                esc[2] = '0';
                esc[3] = '0';
                esc[4] = hex[c >> 4];
                esc[5] = hex[c & 15];
                w = 6;
            } else {
                esc[0] = (char)c;
                w = 1;
            }
        }
        warren_buf_raw(b, esc, w);
    }
}

/* Append the UTF-8 text s (n bytes) as a JSON string, quotes included. */
static inline void warren_buf_string(warren_buf *b, const char *s, size_t n) {
    warren_buf_raw(b, "\"", 1);
    warren_buf_escaped(b, s, n);
    warren_buf_raw(b, "\"", 1);
}

/* Append an integer. */
static inline void warren_buf_int(warren_buf *b, int64_t v) {
    char tmp[24];
    int n = snprintf(tmp, sizeof tmp, "%lld", (long long)v);
    warren_buf_raw(b, tmp, (size_t)n);
}

static inline void warren_buf_free(warren_buf *b) {
    free(b->ptr);
    b->ptr = NULL;
    b->len = b->cap = 0;
    b->oom = false;
}

/*
 * JSON-escape s (n bytes of UTF-8) into dst as a quoted JSON string, writing at most cap bytes
 * and no NUL. Returns the full length (may exceed cap, like snprintf).
 */
static inline size_t warren_json_escape(const char *s, size_t n, char *dst, size_t cap) {
    warren_buf b = WARREN_BUF_INIT;
    warren_buf_string(&b, s, n);
    size_t len = b.len;
    if (b.ptr)
        memcpy(dst, b.ptr, len < cap ? len : cap);
    warren_buf_free(&b);
    return len;
}

/* ---------------------------------------------------------------------------------------- */
/* Results, errors and logs.                                                                  */

/* Emit one result: n bytes of JSON text. Call several times to stream several results; a
 * method that emits none returns null. Returns WARREN_OK. */
static inline int32_t warren_output(const char *json, size_t n) {
    warren_raw_output_write(json, (int32_t)n);
    return WARREN_OK;
}

static inline int32_t warren_output_str(warren_str json) { return warren_output(json.ptr, json.len); }

static inline int32_t warren_output_cstr(const char *json) { return warren_output(json, strlen(json)); }

static inline int32_t warren_output_int(int64_t v) {
    char tmp[24];
    int n = snprintf(tmp, sizeof tmp, "%lld", (long long)v);
    return warren_output(tmp, (size_t)n);
}

/* Emit the UTF-8 text s (n bytes) as a JSON string result. */
static inline int32_t warren_output_string(const char *s, size_t n) {
    warren_buf b = WARREN_BUF_INIT;
    warren_buf_string(&b, s, n);
    warren_output(b.ptr ? b.ptr : "null", b.ptr ? b.len : 4);
    warren_buf_free(&b);
    return WARREN_OK;
}

/* Emit a finished buffer as one result. */
static inline int32_t warren_output_buf(const warren_buf *b) {
    if (b->oom)
        return warren_output_cstr("null");
    return warren_output(b->ptr ? b->ptr : "null", b->ptr ? b->len : 4);
}

/*
 * Set the structured error {"class", "message", "data"} and return WARREN_FAILED, so a method
 * can `return warren_error_n(...)`. data_json is raw JSON text, or NULL for no data.
 */
static inline int32_t warren_error_n(const char *cls, const char *message, size_t message_len,
                                     const char *data_json, size_t data_len) {
    warren_buf b = WARREN_BUF_INIT;
    warren_buf_cstr(&b, "{\"class\":");
    warren_buf_string(&b, cls, strlen(cls));
    warren_buf_cstr(&b, ",\"message\":");
    warren_buf_string(&b, message, message_len);
    if (data_json) {
        warren_buf_cstr(&b, ",\"data\":");
        warren_buf_raw(&b, data_json, data_len);
    }
    warren_buf_cstr(&b, "}");
    if (!b.oom)
        warren_raw_error_write(b.ptr, (int32_t)b.len);
    /* Out of memory: no error JSON, and the non-zero status still fails as GuestError. */
    warren_buf_free(&b);
    return WARREN_FAILED;
}

/* warren_error_n with NUL-terminated message and data (data may be NULL). */
static inline int32_t warren_error(const char *cls, const char *message, const char *data_json) {
    return warren_error_n(cls, message, strlen(message), data_json,
                          data_json ? strlen(data_json) : 0);
}

/* Fail with an error JSON as the host wrote it ({"class", "message", "data"}), e.g. the reply
 * of a failed warren_call: the caller then sees the remote failure unchanged. */
static inline int32_t warren_error_json(warren_str error) {
    warren_raw_error_write(error.ptr, (int32_t)error.len);
    return WARREN_FAILED;
}

/* Log n bytes of UTF-8 at level (WARREN_TRACE .. WARREN_ERROR). */
static inline void warren_log_n(enum warren_level level, const char *msg, size_t n) {
    warren_raw_log((int32_t)level, msg, (int32_t)n);
}

static inline void warren_log(enum warren_level level, const char *msg) {
    warren_log_n(level, msg, strlen(msg));
}

/* printf-style logging (lines over 1 KiB are cut). */
__attribute__((format(printf, 2, 3))) static inline void warren_logf(enum warren_level level,
                                                                       const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    warren_log_n(level, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

#ifdef __cplusplus
}
#endif

#endif /* WARREN_H */
