/* The residual add and the RMSNorm that follows it, in one pass over each row (fp32):
       r = x + residual                      (r = x where there is no residual yet: the first layer)
       y = r / sqrt(mean(r^2) + eps) * w
   A decode step calls this twice per layer on one row: one C call instead of eight small PyTorch ops.
   Each row's arithmetic is the same whatever the number of rows. */
#include <math.h>
#include <stdint.h>

static void row(const float *x, const float *residual, const float *w, float *r, float *y, int64_t dim, float eps) {
    float squares = 0.0f;
    for (int64_t i = 0; i < dim; i++) {
        float v = residual ? x[i] + residual[i] : x[i];
        squares += v * v;
    }
    float inv = 1.0f / sqrtf(squares / (float)dim + eps);
    for (int64_t i = 0; i < dim; i++) {
        float v = residual ? x[i] + residual[i] : x[i];
        if (r) r[i] = v;
        y[i] = v * inv * w[i];
    }
}

/* x, residual (or NULL), r (or NULL: not stored), y: [rows, dim]; w: [dim]. r may alias residual. */
int add_rms_norm(const float *x, const float *residual, const float *w, float *r, float *y, int64_t rows,
                 int64_t dim, float eps) {
    #pragma omp parallel for schedule(static) if (rows * dim >= 1 << 16)
    for (int64_t i = 0; i < rows; i++)
        row(x + i * dim, residual ? residual + i * dim : 0, w, r ? r + i * dim : 0, y + i * dim, dim, eps);
    return 0;
}
