/* hello-c: the polyglot contract (../polyglot.md) in C, on guest-sdk/c/warren.h. */
#include "warren.h"

#define COUNT_RANGE "n must be an integer from 0 to 1000"

/* echo {"value": V} -> V, the value's JSON text as it arrived. */
WARREN_METHOD(echo) {
    warren_str value;
    if (!warren_json_get(warren_args(), "value", &value))
        return warren_error("InvalidArgs", "missing field: value", NULL);
    return warren_output_str(value);
}

/* fail {"message": M} -> error PluginError M (default "failed") with data {"code": 42}. */
WARREN_METHOD(fail) {
    static const char data[] = "{\"code\":42}";
    warren_str m;
    if (warren_json_get(warren_args(), "message", &m) &&
        warren_json_type(m) == WARREN_JSON_STRING) {
        long n = warren_json_unescape(m, NULL, 0); /* measure */
        char *text = malloc((size_t)n + 1);
        if (text) {
            warren_json_unescape(m, text, (size_t)n);
            return warren_error_n("PluginError", text, (size_t)n, data, sizeof data - 1);
        }
    }
    return warren_error("PluginError", "failed", data);
}

/* count {"n": N} -> streams 1..N (0 <= N <= 1000), logging "counting to N" at info. */
WARREN_METHOD(count) {
    warren_str v;
    int64_t n;
    if (!warren_json_get(warren_args(), "n", &v) || !warren_json_int(v, &n) || n < 0 || n > 1000)
        return warren_error("InvalidArgs", COUNT_RANGE, NULL);
    warren_logf(WARREN_INFO, "counting to %lld", (long long)n);
    for (int64_t i = 1; i <= n; i++)
        warren_output_int(i);
    return WARREN_OK;
}

/* whoami -> the context's user_id (a string), else null. */
WARREN_METHOD(whoami) {
    warren_str user;
    if (warren_json_get(warren_context(), "user_id", &user) &&
        warren_json_type(user) == WARREN_JSON_STRING)
        return warren_output_str(user);
    return warren_output_cstr("null");
}
