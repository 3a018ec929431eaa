/* The controller's two stage networks at batch size 1, in plain C (policies/native.py loads it).

   A request's stage networks are ~155k multiply-adds; through torch (eager or compiled) their time in
   a request is the dispatch of ~25 small ops or one compiled graph's guards, run with caches the
   model's phases just evicted (0.8-1.0 ms a stage on the 2-core VM, docs/BENCHMARKS.md 2d). Here a stage
   is one call over the parameters' own float32 storage (torch's (out, in) layout), computing what
   policies/predictors.py and policies/budget_encoder.py compute: Linear, LayerNorm (eps 1e-5, biased
   variance), exact GELU (erf), the sinusoidal code with frequencies computed by torch. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define LN_EPS 1e-5

/* y[o] = b[o] + sum_i W[o, i] x[i] */
static void linear(const float *W, const float *b, const float *x, int in, int out, float *y) {
    for (int o = 0; o < out; ++o) {
        const float *w = W + (size_t)o * in;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int i = 0; i < in; ++i) acc += w[i] * x[i];
        y[o] = acc + b[o];
    }
}

static void layer_norm(const float *x, int n, const float *g, const float *b, float *y) {
    double mean = 0.0, var = 0.0;
    for (int i = 0; i < n; ++i) mean += x[i];
    mean /= n;
    for (int i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
    float inv = (float)(1.0 / sqrt(var / n + LN_EPS));
    for (int i = 0; i < n; ++i) y[i] = (float)(x[i] - mean) * inv * g[i] + b[i];
}

static void gelu(float *x, int n) {
    for (int i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
}

/* sin and cos of scaled * freqs (half each), scaled = value * scale: policies.budget_encoder.sinusoidal_code. */
static void sinusoid(float scaled, const float *freqs, int half, float *y) {
    for (int i = 0; i < half; ++i) {
        float a = scaled * freqs[i];
        y[i] = sinf(a);
        y[half + i] = cosf(a);
    }
}

/* Stage 1: budget encoder (sinusoid -> Linear -> LayerNorm -> GELU -> Linear -> LayerNorm) and
   Knob1 (LayerNorm(language) ++ budget feature -> Linear -> GELU -> Linear -> GELU -> two heads).
   p: freqs, enc0 W b, enc1 g b, enc3 W b, enc4 g b, lang_norm g b, trunk0 W b, trunk2 W b,
      head_a W b, head_b W b, the encoder's budget range (lo, hi) (20 pointers).
   dims: sinusoidal S, d_model D, language L, hidden H, heads A, B.
   The budget is read as budget_ms / time_scale, normalised over the range, times code_scale (the
   sinusoid's scale), in float32 as torch does. out: head A logits, head B logits; token: D floats.
   work: >= S + 2 D + L + 2 H floats. */
void stage1(const float *const *p, const int *dims, float time_scale, float code_scale, const float *budget_ms,
            const float *language, float *out, float *token, float *work) {
    int S = dims[0], D = dims[1], L = dims[2], H = dims[3], A = dims[4], B = dims[5];
    float *code = work, *h = code + S, *x = h + D, *t0 = x + L + D, *t1 = t0 + H;
    const float *range = p[19];
    float budget = *budget_ms / time_scale;
    sinusoid((budget - range[0]) / (range[1] - range[0]) * code_scale, p[0], S / 2, code);
    linear(p[1], p[2], code, S, D, h);
    layer_norm(h, D, p[3], p[4], h);
    gelu(h, D);
    linear(p[5], p[6], h, D, D, token);
    layer_norm(token, D, p[7], p[8], token);
    layer_norm(language, L, p[9], p[10], x);
    for (int i = 0; i < D; ++i) x[L + i] = token[i];
    linear(p[11], p[12], x, L + D, H, t0);
    gelu(t0, H);
    linear(p[13], p[14], t0, H, H, t1);
    gelu(t1, H);
    linear(p[15], p[16], t1, H, A, out);
    linear(p[17], p[18], t1, H, B, out + A);
}

/* Stage 2: Knob2Knob3 ([LayerNorm(token)] ++ insertion embedding ++ [elapsed code] -> Linear -> GELU
   -> Linear -> GELU -> two heads). p: token_norm g b (NULL without the token), embedding, elapsed
   freqs (NULL without the elapsed code), trunk0 W b, trunk2 W b, head_a W b, head_b W b, the elapsed
   code's time scale (NULL without it) (13 pointers).
   dims: d_model D (0: no token), hidden H, elapsed half E (0: no code), heads A, B.
   Each time is read as ms / time_scale / the code's time scale, times code_scale, in float32.
   work: >= D + H + 4 E + 2 H floats. */
void stage2(const float *const *p, const int *dims, float time_scale, float code_scale, const float *token,
            const int64_t *insertion, const float *elapsed_ms, const float *remaining_ms, float *out, float *work) {
    int D = dims[0], H = dims[1], E = dims[2], A = dims[3], B = dims[4];
    int in = D + H + 4 * E;
    float *x = work, *t0 = x + in, *t1 = t0 + H;
    if (D) layer_norm(token, D, p[0], p[1], x);
    const float *emb = p[2] + (size_t)*insertion * H;
    for (int i = 0; i < H; ++i) x[D + i] = emb[i];
    if (E) {
        float scale = *p[12];
        sinusoid(*elapsed_ms / time_scale / scale * code_scale, p[3], E, x + D + H);
        sinusoid(*remaining_ms / time_scale / scale * code_scale, p[3], E, x + D + H + 2 * E);
    }
    linear(p[4], p[5], x, in, H, t0);
    gelu(t0, H);
    linear(p[6], p[7], t0, H, H, t1);
    gelu(t1, H);
    linear(p[8], p[9], t1, H, A, out);
    linear(p[10], p[11], t1, H, B, out + A);
}
