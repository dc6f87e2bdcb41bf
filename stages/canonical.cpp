// The codec's probabilities in pinned float arithmetic: `stages/canonical.py`.
//
// A file written by `make compress` decodes only where the decoder computes bit-identical
// probabilities. ATen's kernels do not promise that across CPUs (their vector width, MKL's code
// path and the thread count all change the order of a sum), so the codec computes the
// conditioning network and the cached slice decoder here, with no ATen arithmetic at all:
//
//   * every sum runs in one fixed order (matrix products over k = 0 .. K-1, norms and softmax
//     over their elements in index order); loops are vectorised only across independent outputs,
//     which leaves each output's order of operations alone;
//   * only IEEE-754 operations that are correctly rounded everywhere: + - * / and sqrt, in float32
//     for products and in float64 for norms, softmax and probabilities; exp and erf are computed
//     here from those operations (no libm, whose results differ between versions);
//   * it must be compiled with -ffp-contract=off and without -ffast-math (stages/canonical.py
//     does), so that no compiler fuses a multiply and an add or reorders a sum.
//
// Results therefore depend on nothing but the weights and the inputs: the same on any CPU that
// does IEEE-754 arithmetic, whatever the vector instructions the build used. They equal the
// PyTorch forward pass up to float rounding (and GELU's erf to 1.5e-7), which costs the codec
// nothing measurable; they are not the samplers' floats, and need not be.
//
// Weights arrive as the modules' own named parameters (`dict(module.named_parameters())`, plus
// the decoder's `pixel_index` buffer), so there is no second layout to keep in step: a name this
// file does not read is an error naming it.
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

using torch::Tensor;
using Weights = std::map<std::string, Tensor>;

namespace {

// ------------------------------------------------------------ elementary functions
// Branch-free and inline, so that loops over arrays of them vectorise (which changes no result).
inline double pinned_exp(double x) {
  x = x < -708.0 ? -708.0 : (x > 708.0 ? 708.0 : x);
  // x = n ln2 + r with n an integer, |r| <= ln2 / 2 (a little more where the sum below rounds up)
  const double n = static_cast<double>(static_cast<int64_t>(x * 1.4426950408889634 + 1100.5)) - 1100.0;
  const double r = (x - n * 0.693145751953125) - n * 1.4286068203094172e-06;  // ln2 in two parts
  double p = 1.0 / 6227020800.0;  // Taylor series to r^13 / 13!, by Horner's rule
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t bits = (static_cast<int64_t>(n) + 1023) << 52;  // 2^n exactly (n >= -1021)
  double scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7)
inline double pinned_erf(double x) {
  const double a = x < 0 ? -x : x;
  const double t = 1.0 / (1.0 + 0.3275911 * a);
  const double poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t;
  const double e = 1.0 - poly * pinned_exp(-a * a);
  return x < 0 ? -e : e;
}

// In place, x[i] <- GELU(x[i]) = x/2 (1 + erf(x / sqrt 2)), computed in float64.
void gelu(float* __restrict__ x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double v = x[i];
    x[i] = static_cast<float>(0.5 * v * (1.0 + pinned_erf(v * 0.7071067811865476)));
  }
}

// ------------------------------------------------------------ layers
// y (M, N) = x (M, K) W^T + b, W given as its transpose wt (K, N); each output summed over k in order,
// then the bias added. Outputs are computed in tiles of 64 held in registers across k.
void linear(const float* __restrict__ x, const std::vector<float>& wt, const float* __restrict__ bias,
            float* __restrict__ y, int64_t M, int64_t K, int64_t N) {
  constexpr int64_t TILE = 64;
  const float* __restrict__ w = wt.data();
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    float* __restrict__ out = y + m * N;
    int64_t n0 = 0;
    for (; n0 + TILE <= N; n0 += TILE) {
      float acc[TILE] = {};
      for (int64_t k = 0; k < K; ++k) {
        const float xk = row[k];
        const float* __restrict__ wk = w + k * N + n0;
        for (int64_t j = 0; j < TILE; ++j) acc[j] += xk * wk[j];
      }
      for (int64_t j = 0; j < TILE; ++j) out[n0 + j] = acc[j];
    }
    for (int64_t n = n0; n < N; ++n) out[n] = 0.f;  // the last, partial tile
    for (int64_t k = 0; k < K && n0 < N; ++k) {
      const float xk = row[k];
      for (int64_t n = n0; n < N; ++n) out[n] += xk * w[k * N + n];
    }
    if (bias != nullptr)
      for (int64_t n = 0; n < N; ++n) out[n] += bias[n];
  }
}

// Normalise each of M rows of D values (layer norm; group norm with one group), then scale and shift
// per column c = index / per_column.
void normalise(const float* x, float* y, int64_t M, int64_t D, const float* weight, const float* bias,
               int64_t per_column, double eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* in = x + m * D;
    float* out = y + m * D;
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < D; ++i) mean += in[i];
    mean /= static_cast<double>(D);
    for (int64_t i = 0; i < D; ++i) var += (in[i] - mean) * (in[i] - mean);
    const double scale = 1.0 / std::sqrt(var / static_cast<double>(D) + eps);
    for (int64_t c = 0; c < D / per_column; ++c)
      for (int64_t i = c * per_column; i < (c + 1) * per_column; ++i)
        out[i] = static_cast<float>((in[i] - mean) * scale * weight[c] + bias[c]);
  }
}

// In place: x[i] <- exp(x[i] - max) / sum, over n values; e: room for n doubles.
void softmax(float* __restrict__ x, int64_t n, double* __restrict__ e) {
  float top = x[0];
  for (int64_t i = 1; i < n; ++i) top = x[i] > top ? x[i] : top;
  for (int64_t i = 0; i < n; ++i) e[i] = pinned_exp(static_cast<double>(x[i]) - top);
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += e[i];
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(e[i] / total);
}

// ------------------------------------------------------------ weights
class Params {
 public:
  explicit Params(Weights weights) : weights_(std::move(weights)) {}  // holds the tensors alive

  bool has(const std::string& name) const { return weights_.count(name) > 0; }

  const Tensor& get(const std::string& name) {
    auto found = weights_.find(name);
    TORCH_CHECK(found != weights_.end(), "canonical path: no weight '", name, "'");
    TORCH_CHECK(found->second.device().is_cpu() && found->second.is_contiguous(), name, " must be contiguous on the CPU");
    used_.insert(name);
    return found->second;
  }

  const float* data(const std::string& name) { return get(name).data_ptr<float>(); }

  // A Linear's (N, K) weight as its transpose (K, N).
  std::vector<float> transposed(const std::string& name) {
    const Tensor& w = get(name);
    const int64_t N = w.size(0), K = w.numel() / N;
    const float* p = w.data_ptr<float>();
    std::vector<float> t(K * N);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) t[k * N + n] = p[n * K + k];
    return t;
  }

  // Every weight given must have been read: a layer this file does not know is an error by name.
  void check_all_used() const {
    for (const auto& entry : weights_)
      TORCH_CHECK(used_.count(entry.first), "canonical path: weight '", entry.first,
                  "' is not computed here; add its layer to stages/canonical.cpp");
  }

 private:
  Weights weights_;
  std::set<std::string> used_;
};

struct Dense {
  std::vector<float> wt;
  const float* bias;
  int64_t in, out;
  Dense(Params& p, const std::string& name)
      : wt(p.transposed(name + ".weight")), bias(p.data(name + ".bias")),
        in(p.get(name + ".weight").numel() / p.get(name + ".weight").size(0)), out(p.get(name + ".weight").size(0)) {}
  void operator()(const float* x, float* y, int64_t rows) const { linear(x, wt, bias, y, rows, in, out); }
};

struct Norm {
  const float *weight, *bias;
  Norm(Params& p, const std::string& name) : weight(p.data(name + ".weight")), bias(p.data(name + ".bias")) {}
};

// A pre-norm transformer block (stages/networks.py `Block`).
struct Block {
  Norm norm1, norm2;
  Dense qkv, proj, up, down;
  Block(Params& p, const std::string& name)
      : norm1(p, name + ".norm1"), norm2(p, name + ".norm2"), qkv(p, name + ".attention.qkv"),
        proj(p, name + ".attention.proj"), up(p, name + ".mlp.0"), down(p, name + ".mlp.2") {}

  // x (rows, W) += the MLP of norm2(x), in place.
  void mlp(float* x, int64_t rows, int64_t W, double eps) const {
    std::vector<float> h(rows * W), hidden(rows * up.out), y(rows * W);
    normalise(x, h.data(), rows, W, norm2.weight, norm2.bias, 1, eps);
    up(h.data(), hidden.data(), rows);
    gelu(hidden.data(), rows * up.out);
    down(hidden.data(), y.data(), rows);
    for (int64_t i = 0; i < rows * W; ++i) x[i] += y[i];
  }
};

int64_t count_blocks(const Params& p, const std::string& prefix) {
  int64_t n = 0;
  while (p.has(prefix + std::to_string(n) + ".norm1.weight")) ++n;
  return n;
}

// Unmasked self-attention of P positions for each of B items: x (B, P, W) += attention(norm1(x)).
void full_attention(const Block& block, float* x, int64_t B, int64_t P, int64_t W, int64_t heads, double eps) {
  const int64_t d = W / heads;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  std::vector<float> h(P * W), qkv(P * 3 * W), y(P * W), out(P * W), scores(P), keys(d * P);
  std::vector<double> room(P);
  for (int64_t b = 0; b < B; ++b) {
    float* xb = x + b * P * W;
    normalise(xb, h.data(), P, W, block.norm1.weight, block.norm1.bias, 1, eps);
    block.qkv(h.data(), qkv.data(), P);  // columns (q|k|v, head, d)
    for (int64_t hd = 0; hd < heads; ++hd) {
      for (int64_t e = 0; e < d; ++e)  // this head's keys transposed, (d, P): the score loop runs over positions
        for (int64_t j = 0; j < P; ++j) keys[e * P + j] = qkv[j * 3 * W + W + hd * d + e];
      for (int64_t i = 0; i < P; ++i) {
        const float* q = qkv.data() + i * 3 * W + hd * d;
        for (int64_t j = 0; j < P; ++j) scores[j] = 0.f;
        for (int64_t e = 0; e < d; ++e) {  // each score summed over e in order
          const float qe = q[e];
          const float* __restrict__ row = keys.data() + e * P;
          for (int64_t j = 0; j < P; ++j) scores[j] += qe * row[j];
        }
        for (int64_t j = 0; j < P; ++j) scores[j] *= scale;
        softmax(scores.data(), P, room.data());
        float* __restrict__ yi = y.data() + i * W + hd * d;
        for (int64_t e = 0; e < d; ++e) yi[e] = 0.f;
        for (int64_t j = 0; j < P; ++j) {
          const float* v = qkv.data() + j * 3 * W + 2 * W + hd * d;
          for (int64_t e = 0; e < d; ++e) yi[e] += scores[j] * v[e];
        }
      }
    }
    block.proj(y.data(), out.data(), P);
    for (int64_t i = 0; i < P * W; ++i) xb[i] += out[i];
    block.mlp(xb, P, W, eps);
  }
}

// 3x3 convolution with zero padding of x (Ci, h, w) into y (Co, h, w): im2col rows per pixel,
// columns (ci, ky, kx) as in the (Co, Ci, 3, 3) weight, then `linear`.
void conv3x3(const float* x, const Dense& conv, float* y, int64_t Ci, int64_t h, int64_t w) {
  const int64_t P = h * w, K = Ci * 9, Co = conv.out;
  std::vector<float> columns(P * K, 0.f), out(P * Co);
  for (int64_t py = 0; py < h; ++py)
    for (int64_t px = 0; px < w; ++px)
      for (int64_t c = 0; c < Ci; ++c)
        for (int64_t ky = 0; ky < 3; ++ky)
          for (int64_t kx = 0; kx < 3; ++kx) {
            const int64_t sy = py + ky - 1, sx = px + kx - 1;
            if (sy >= 0 && sy < h && sx >= 0 && sx < w)
              columns[(py * w + px) * K + c * 9 + ky * 3 + kx] = x[(c * h + sy) * w + sx];
          }
  conv(columns.data(), out.data(), P);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t c = 0; c < Co; ++c) y[c * P + p] = out[p * Co + c];
}

}  // namespace

// The conditioning network (stages/networks.py `ConditioningNetwork`): stack (B, Cin, h, w), target slice
// ids k (B,) -> context (B, h*w, width). `eps`: the epsilon of every layer and group norm.
Tensor context(const Weights& weights, const Tensor& stack, const Tensor& k, int64_t heads, double eps) {
  Params p(weights);
  TORCH_CHECK(stack.scalar_type() == torch::kFloat32 && stack.is_contiguous() && stack.dim() == 4,
              "stack must be a contiguous float32 (B, C, h, w) tensor");
  const int64_t B = stack.size(0), Ci = stack.size(1), h = stack.size(2), w = stack.size(3), P = h * w;
  const Dense stem(p, "stem");
  const int64_t W = stem.out;
  const float* meta = p.data("meta_position.weight");
  const float* position = p.data("position");
  std::vector<Dense> convs;
  std::vector<Norm> norms;
  for (int64_t i = 0; p.has("convs." + std::to_string(i) + ".body.0.weight"); ++i) {
    const std::string name = "convs." + std::to_string(i) + ".body.";
    norms.emplace_back(p, name + "0");
    convs.emplace_back(p, name + "2");
    norms.emplace_back(p, name + "3");
    convs.emplace_back(p, name + "5");
  }
  std::vector<Block> blocks;
  for (int64_t i = 0, n = count_blocks(p, "attention."); i < n; ++i) blocks.emplace_back(p, "attention." + std::to_string(i));
  const Norm final_norm(p, "norm");
  p.check_all_used();
  const int64_t* slice = k.data_ptr<int64_t>();

  Tensor result = torch::empty({B, P, W}, stack.options());
  float* out = result.data_ptr<float>();
  std::vector<float> x(W * P), a(W * P), b(W * P);
  for (int64_t n = 0; n < B; ++n) {
    conv3x3(stack.data_ptr<float>() + n * Ci * P, stem, x.data(), Ci, h, w);  // (W, h, w)
    for (int64_t c = 0; c < W; ++c)
      for (int64_t i = 0; i < P; ++i) x[c * P + i] += meta[slice[n] * W + c];
    for (size_t i = 0; i < convs.size(); i += 2) {  // x + conv(gelu(norm(conv(gelu(norm(x))))))
      normalise(x.data(), a.data(), 1, W * P, norms[i].weight, norms[i].bias, P, eps);
      gelu(a.data(), W * P);
      conv3x3(a.data(), convs[i], b.data(), W, h, w);
      normalise(b.data(), a.data(), 1, W * P, norms[i + 1].weight, norms[i + 1].bias, P, eps);
      gelu(a.data(), W * P);
      conv3x3(a.data(), convs[i + 1], b.data(), W, h, w);
      for (int64_t i2 = 0; i2 < W * P; ++i2) x[i2] += b[i2];
    }
    float* xn = out + n * P * W;  // (h w, W) + the learnt position of each pixel
    for (int64_t i = 0; i < P; ++i)
      for (int64_t c = 0; c < W; ++c) xn[i * W + c] = x[c * P + i] + position[i * W + c];
  }
  for (const Block& block : blocks) full_attention(block, out, B, P, W, heads, eps);
  std::vector<float> row(W);
  for (int64_t i = 0; i < B * P; ++i) {
    normalise(out + i * W, row.data(), 1, W, final_norm.weight, final_norm.bias, 1, eps);
    std::copy(row.begin(), row.end(), out + i * W);
  }
  return result;
}

// The cached slice decoder (stages/networks.py `SliceDecoder`), one position at a time, for B sequences.
class Decoder {
 public:
  // weights: the decoder's parameters and `pixel_index`; context (B, h*w, Dc), or an empty tensor for
  // the first-slice decoder.
  Decoder(const Weights& weights, const Tensor& context, int64_t batch, int64_t heads, double eps)
      : params_(weights), B_(batch), heads_(heads), eps_(eps) {
    Params& p = params_;
    const Tensor& embedding = p.get("value_embedding.weight");
    const Tensor& position = p.get("position");
    T_ = position.size(0);
    W_ = position.size(1);
    embedding_ = embedding.data_ptr<float>();
    for (int64_t i = 0, n = count_blocks(p, "blocks."); i < n; ++i) blocks_.emplace_back(p, "blocks." + std::to_string(i));
    final_weight_ = p.data("norm.weight");
    final_bias_ = p.data("norm.bias");
    head_ = std::make_unique<Dense>(p, "head");
    inputs_.assign(B_ * T_ * W_, 0.f);  // position t's input term: the context of its pixel, projected, + position
    const float* pos = position.data_ptr<float>();
    if (context.numel() > 0) {
      const Dense projection(p, "context_projection");
      const int64_t* pixel = p.get("pixel_index").data_ptr<int64_t>();
      const int64_t pixels = context.size(1);
      std::vector<float> projected(B_ * pixels * W_);
      projection(context.contiguous().data_ptr<float>(), projected.data(), B_ * pixels);
      for (int64_t b = 0; b < B_; ++b)
        for (int64_t t = 0; t < T_; ++t)
          for (int64_t i = 0; i < W_; ++i)
            inputs_[(b * T_ + t) * W_ + i] = projected[(b * pixels + pixel[t]) * W_ + i] + pos[t * W_ + i];
    } else {
      p.get("pixel_index");
      for (int64_t b = 0; b < B_; ++b)
        for (int64_t i = 0; i < T_ * W_; ++i) inputs_[b * T_ * W_ + i] = pos[i];
    }
    params_.check_all_used();
    for (size_t l = 0; l < blocks_.size(); ++l) {
      keys_.emplace_back(B_ * T_ * W_, 0.f);  // (B, heads, d, T)
      values_.emplace_back(B_ * T_ * W_, 0.f);  // (B, heads, T, d)
    }
  }

  // previous (B,) the value at t-1 (the start token at t = 0) -> probabilities (B, V) float64 of the value at t.
  Tensor step(const Tensor& previous, int64_t t) {
    TORCH_CHECK(t >= 0 && t < T_ && previous.numel() == B_, "step: t or previous out of range");
    const int64_t W = W_, d = W / heads_, V = head_->out;
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    const int64_t* prev = previous.data_ptr<int64_t>();
    std::vector<float> x(B_ * W), h(B_ * W), qkv(B_ * 3 * W), y(B_ * W), out(B_ * W), scores(t + 1);
    std::vector<double> room(t + 1);
    for (int64_t b = 0; b < B_; ++b)
      for (int64_t i = 0; i < W; ++i) x[b * W + i] = embedding_[prev[b] * W + i] + inputs_[(b * T_ + t) * W + i];
    for (size_t l = 0; l < blocks_.size(); ++l) {
      const Block& block = blocks_[l];
      normalise(x.data(), h.data(), B_, W, block.norm1.weight, block.norm1.bias, 1, eps_);
      block.qkv(h.data(), qkv.data(), B_);
      for (int64_t b = 0; b < B_; ++b)
        for (int64_t hd = 0; hd < heads_; ++hd) {
          const float* q = qkv.data() + b * 3 * W + hd * d;
          float* __restrict__ key = keys_[l].data() + (b * heads_ + hd) * d * T_;  // (d, T): transposed
          float* __restrict__ value = values_[l].data() + (b * heads_ + hd) * T_ * d;  // (T, d)
          for (int64_t e = 0; e < d; ++e) {
            key[e * T_ + t] = q[W + e];
            value[t * d + e] = q[2 * W + e];
          }
          for (int64_t j = 0; j <= t; ++j) scores[j] = 0.f;
          for (int64_t e = 0; e < d; ++e) {  // each score summed over e in order
            const float qe = q[e];
            const float* __restrict__ row = key + e * T_;
            for (int64_t j = 0; j <= t; ++j) scores[j] += qe * row[j];
          }
          for (int64_t j = 0; j <= t; ++j) scores[j] *= scale;
          softmax(scores.data(), t + 1, room.data());
          float* __restrict__ yb = y.data() + b * W + hd * d;
          for (int64_t e = 0; e < d; ++e) yb[e] = 0.f;
          for (int64_t j = 0; j <= t; ++j) {
            const float* __restrict__ vj = value + j * d;
            for (int64_t e = 0; e < d; ++e) yb[e] += scores[j] * vj[e];
          }
        }
      block.proj(y.data(), out.data(), B_);
      for (int64_t i = 0; i < B_ * W; ++i) x[i] += out[i];
      block.mlp(x.data(), B_, W, eps_);
    }
    normalise(x.data(), h.data(), B_, W, final_weight_, final_bias_, 1, eps_);
    std::vector<float> logits(B_ * V);
    (*head_)(h.data(), logits.data(), B_);
    Tensor probabilities = torch::empty({B_, V}, torch::kFloat64);
    double* p = probabilities.data_ptr<double>();
    for (int64_t b = 0; b < B_; ++b) {  // softmax in float64
      const float* l = logits.data() + b * V;
      float top = l[0];
      for (int64_t v = 1; v < V; ++v) top = l[v] > top ? l[v] : top;
      for (int64_t v = 0; v < V; ++v) p[b * V + v] = pinned_exp(static_cast<double>(l[v]) - top);
      double total = 0.0;
      for (int64_t v = 0; v < V; ++v) total += p[b * V + v];
      for (int64_t v = 0; v < V; ++v) p[b * V + v] /= total;
    }
    return probabilities;
  }

 private:
  Params params_;
  int64_t B_, heads_, T_ = 0, W_ = 0;
  double eps_;
  const float* embedding_ = nullptr;
  std::vector<Block> blocks_;
  const float *final_weight_ = nullptr, *final_bias_ = nullptr;
  std::unique_ptr<Dense> head_;
  std::vector<float> inputs_;
  std::vector<std::vector<float>> keys_, values_;
};

// Checks of the pinned functions themselves (tests/test_codec.py): exp and erf at the points given.
std::vector<double> elementary(const std::vector<double>& x) {
  std::vector<double> out;
  for (double v : x) out.push_back(pinned_exp(v));
  for (double v : x) out.push_back(pinned_erf(v));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("context", &context, "The conditioning network in pinned arithmetic (stages/canonical.cpp)");
  m.def("elementary", &elementary, "exp then erf of each value, pinned");
  pybind11::class_<Decoder>(m, "Decoder")
      .def(pybind11::init<const Weights&, const Tensor&, int64_t, int64_t, double>())
      .def("step", &Decoder::step);
}
