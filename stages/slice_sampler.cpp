// The cached decoding of one slice as one C++ loop: `SliceDecoder.sample(method="native")`.
//
// The same computation as `IncrementalDecoder.step` followed by `inverse_cdf` (stages/networks.py),
// step after step, for all T sub-pixels of a slice. On a CPU a step is a chain of small operations
// whose fixed costs outweigh their arithmetic (`make bench`, sampling); this loop removes the Python
// interpreter between them and replaces the attention of the one new query, two `torch.bmm` calls
// on slices of the cache, by two plain loops that the compiler vectorises. Matrix products, layer
// norms, GELU and softmax are still ATen's. Built once per machine by `stages/native.py`.
//
// The weights come packed by `SliceDecoder.pack` and `Block.pack` (stages/networks.py, `PackedDecoder` and
// `PackedBlock` give the shapes), as one {field name: tensor} per decoder and per block
// (`stages.native.named_tensors`), read here by name: a field this loop does not compute is an error.
// Layouts (B images, H heads, head dimension d, width W = H * d, T sub-pixels, V values):
//   qkv rows (B, 3W) ordered (head, q|k|v, d), the query pre-scaled by d**-0.5 (`PackedBlock`);
//   keys (B*H, d, T) and values (B*H, T, d) of each layer, position t written at step t.
#include <torch/extension.h>

#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

using torch::Tensor;

namespace {

// Store the new key and value of every head at position t; scores (B*H, t+1): q . key_j for j <= t.
void store_and_score(const float* __restrict__ qkv, float* __restrict__ keys, float* __restrict__ values,
                     float* __restrict__ scores, int64_t heads_total, int64_t d, int64_t T, int64_t t) {
  for (int64_t bh = 0; bh < heads_total; ++bh) {
    const float* q = qkv + bh * 3 * d;
    float* key = keys + bh * d * T;
    float* value = values + bh * T * d;
    for (int64_t i = 0; i < d; ++i) {
      key[i * T + t] = q[d + i];
      value[t * d + i] = q[2 * d + i];
    }
    float* s = scores + bh * (t + 1);
    for (int64_t j = 0; j <= t; ++j) s[j] = 0.f;
    for (int64_t i = 0; i < d; ++i) {  // over positions j, contiguous in the transposed keys
      const float qi = q[i];
      const float* row = key + i * T;
      for (int64_t j = 0; j <= t; ++j) s[j] += qi * row[j];
    }
  }
}

// out (B*H, d): sum over j <= t of weights_j * value_j, for every head.
void weigh_values(const float* __restrict__ weights, const float* __restrict__ values, float* __restrict__ out,
                  int64_t heads_total, int64_t d, int64_t T, int64_t t) {
  for (int64_t bh = 0; bh < heads_total; ++bh) {
    const float* w = weights + bh * (t + 1);
    const float* value = values + bh * T * d;
    float* y = out + bh * d;
    for (int64_t i = 0; i < d; ++i) y[i] = 0.f;
    for (int64_t j = 0; j <= t; ++j) {
      const float wj = w[j];
      const float* v = value + j * d;
      for (int64_t i = 0; i < d; ++i) y[i] += wj * v[i];
    }
  }
}

void check_cpu_float(const Tensor& tensor, const std::string& name) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == torch::kFloat32 && tensor.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
}

using Named = std::map<std::string, Tensor>;

// The fields of one packed decoder or block, each read once by name; `check_all_read` refuses the rest.
class Fields {
 public:
  Fields(const Named& fields, std::string what) : fields_(fields), what_(std::move(what)) {}

  Tensor tensor(const std::string& name) {
    const Tensor& value = get(name);
    check_cpu_float(value, what_ + "." + name);
    return value;
  }

  double scalar(const std::string& name) { return get(name).item<double>(); }

  void check_all_read() const {
    for (const auto& field : fields_)
      TORCH_CHECK(read_.count(field.first), what_, ".", field.first,
                  " is not computed by stages/slice_sampler.cpp: compute it there too");
  }

 private:
  const Tensor& get(const std::string& name) {
    const auto found = fields_.find(name);
    TORCH_CHECK(found != fields_.end(), what_, " has no field ", name);
    read_.insert(name);
    return found->second;
  }

  const Named& fields_;
  const std::string what_;
  std::set<std::string> read_;
};

// stages/networks.py `PackedBlock`: one causal transformer block, matrices (in, out) for addmm.
struct PackedBlock {
  Tensor norm1_weight, norm1_bias, qkv_weight, qkv_bias, proj_weight, proj_bias;
  Tensor norm2_weight, norm2_bias, up_weight, up_bias, down_weight, down_bias;
  double norm1_eps, norm2_eps;

  PackedBlock(const Named& fields, int64_t index) {
    Fields f(fields, "PackedBlock " + std::to_string(index));
    norm1_weight = f.tensor("norm1_weight");
    norm1_bias = f.tensor("norm1_bias");
    qkv_weight = f.tensor("qkv_weight");
    qkv_bias = f.tensor("qkv_bias");
    proj_weight = f.tensor("proj_weight");
    proj_bias = f.tensor("proj_bias");
    norm2_weight = f.tensor("norm2_weight");
    norm2_bias = f.tensor("norm2_bias");
    up_weight = f.tensor("up_weight");
    up_bias = f.tensor("up_bias");
    down_weight = f.tensor("down_weight");
    down_bias = f.tensor("down_bias");
    norm1_eps = f.scalar("norm1_eps");
    norm2_eps = f.scalar("norm2_eps");
    f.check_all_read();
  }
};

}  // namespace

// Draw the T values of one slice for B images: `decoder` the fields of a `PackedDecoder` but its blocks,
// `blocks` those of each `PackedBlock`, `noise` (B, T) uniforms, `start` the start token's value.
// Returns values (B, T) int64 and their log-probability at temperature 1, (B,) float32 nats.
std::tuple<Tensor, Tensor> sample_slice(const Named& decoder, const std::vector<Named>& blocks, const Tensor& noise,
                                        int64_t start, int64_t heads, double temperature) {
  torch::NoGradGuard no_grad;
  Fields fields(decoder, "PackedDecoder");
  const Tensor embedding = fields.tensor("embedding"), inputs = fields.tensor("inputs");
  const Tensor norm_weight = fields.tensor("norm_weight"), norm_bias = fields.tensor("norm_bias");
  const double norm_eps = fields.scalar("norm_eps");
  const Tensor head_weight = fields.tensor("head_weight"), head_bias = fields.tensor("head_bias");
  fields.check_all_read();
  std::vector<PackedBlock> layers;
  for (size_t l = 0; l < blocks.size(); ++l) layers.emplace_back(blocks[l], static_cast<int64_t>(l));
  check_cpu_float(noise, "noise");
  const int64_t B = inputs.size(0), T = inputs.size(1), W = inputs.size(2), V = head_weight.size(1);
  const int64_t d = W / heads, heads_total = B * heads;
  TORCH_CHECK(noise.size(0) == B && noise.size(1) == T, "noise must be (B, T)");
  const auto options = inputs.options();
  std::vector<Tensor> keys, values;
  for (size_t l = 0; l < layers.size(); ++l) {  // only positions <= t are read at step t, all written before
    keys.push_back(torch::empty({heads_total, d, T}, options));
    values.push_back(torch::empty({heads_total, T, d}, options));
  }
  Tensor drawn = torch::empty({B, T}, options.dtype(torch::kLong));
  Tensor log_prob = torch::zeros({B}, options);
  Tensor x = torch::empty({B, W}, options), y = torch::empty({B, W}, options);
  std::vector<int64_t> previous(B, start);
  const float* table = embedding.data_ptr<float>();
  const float* input = inputs.data_ptr<float>();
  const float* uniform = noise.data_ptr<float>();
  int64_t* out = drawn.data_ptr<int64_t>();
  float* total = log_prob.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    if (PyErr_CheckSignals() != 0) throw pybind11::error_already_set();  // Ctrl+C: KeyboardInterrupt now
    float* row = x.data_ptr<float>();  // x = embedding of the previous value + the input term of t
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < W; ++i) row[b * W + i] = table[previous[b] * W + i] + input[(b * T + t) * W + i];
    for (size_t l = 0; l < layers.size(); ++l) {
      const PackedBlock& p = layers[l];
      Tensor qkv = at::addmm(p.qkv_bias, at::layer_norm(x, {W}, p.norm1_weight, p.norm1_bias, p.norm1_eps), p.qkv_weight);
      Tensor scores = torch::empty({heads_total, t + 1}, options);
      store_and_score(qkv.data_ptr<float>(), keys[l].data_ptr<float>(), values[l].data_ptr<float>(),
                      scores.data_ptr<float>(), heads_total, d, T, t);
      Tensor weights = at::softmax(scores, -1);
      weigh_values(weights.data_ptr<float>(), values[l].data_ptr<float>(), y.data_ptr<float>(), heads_total, d, T, t);
      x.add_(at::addmm(p.proj_bias, y, p.proj_weight));
      Tensor hidden = at::addmm(p.up_bias, at::layer_norm(x, {W}, p.norm2_weight, p.norm2_bias, p.norm2_eps), p.up_weight);
      at::gelu_(hidden);
      x.add_(at::addmm(p.down_bias, hidden, p.down_weight));
    }
    // inverse_cdf: the first value whose CDF reaches u * total mass (torch.searchsorted, left side)
    Tensor log_p = at::log_softmax(at::addmm(head_bias, at::layer_norm(x, {W}, norm_weight, norm_bias, norm_eps),
                                             head_weight), -1);
    Tensor cdf = at::softmax(temperature == 1.0 ? log_p : log_p / temperature, -1).cumsum(-1);
    const float* c = cdf.data_ptr<float>();
    const float* lp = log_p.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      const float* cb = c + b * V;
      const float target = uniform[b * T + t] * cb[V - 1];
      int64_t lo = 0, hi = V;
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (cb[mid] < target) lo = mid + 1; else hi = mid;
      }
      const int64_t value = lo < V ? lo : V - 1;
      previous[b] = value;
      out[b * T + t] = value;
      total[b] += lp[b * V + value];
    }
  }
  return {drawn, log_prob};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sample_slice", &sample_slice, "Draw one slice: cached decoding in one C++ loop (stages/slice_sampler.cpp)");
}
