// A bf16 linear layer for MLX's CPU backend.
//
// MLX's CPU matmuls run in fp32 (cblas_sgemm); its bf16 matmul has no fast path. This
// primitive keeps a layer's weight in bf16, packed once into oneDNN's blocked layout, and
// computes y = x @ W.T + b with oneDNN's bf16 matmul (AVX512-BF16 or AMX kernels, fp32
// accumulation). x is fp32 and converted to bf16 on the fly; y is fp32.
//
// Python API (module akidb_embed._bf16):
//   mlx_version() -> str         the mlx it was built against (its C++ ABI)
//   isa() -> str                 oneDNN's effective CPU ISA, e.g. "avx512_core_bf16"
//   bf16_supported() -> bool     whether that ISA has bf16 dot-product instructions
//   bf16_runnable() -> bool      whether oneDNN has any bf16 matmul here (else: AVX2 only)
//   set_threads(n)               threads for the matmuls (OpenMP builds of oneDNN)
//   PackedLinear(weight, bias)   weight (out, in) float array, bias (out,) or None
//   linear(x, packed) -> array   x (..., in) -> (..., out), float32
//   plan_count() -> int          matmul shapes planned (shared across layers)

#include <dnnl.hpp>
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/transforms.h"

#if defined(AKIDB_HAVE_OPENMP) && DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
#include <omp.h>
#define AKIDB_OMP 1
#endif

namespace mx = mlx::core;
namespace nb = nanobind;
using namespace nb::literals;

namespace {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

std::atomic<int> g_threads{1};

void apply_threads() {
#ifdef AKIDB_OMP
  // OpenMP's thread count is per calling thread: set it on MLX's CPU stream thread.
  thread_local int applied = -1;
  int wanted = g_threads.load();
  if (applied != wanted) {
    omp_set_num_threads(wanted);
    applied = wanted;
  }
#endif
}

// ---- fp32 -> bf16 (round to nearest even) ------------------------------------------------

inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  }
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

__attribute__((target("avx512f,avx512bf16,avx512vl"))) void convert_avx512bf16(
    const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), reinterpret_cast<__m256i&>(v));
  }
  for (; i < n; ++i) dst[i] = to_bf16(src[i]);
}

void convert_scalar(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_bf16(src[i]);
}

bool cpu_has_avx512bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

void convert(const float* src, uint16_t* dst, int64_t n) {
  if (cpu_has_avx512bf16()) {
    convert_avx512bf16(src, dst, n);
  } else {
    convert_scalar(src, dst, n);
  }
}

// ---- The packed weight and its matmuls ---------------------------------------------------

// Rows are rounded up to a few sizes per power of two, so a server sees a bounded set of
// matmul shapes (one oneDNN primitive each) however its batches vary.
int64_t bucket_rows(int64_t m) {
  if (m <= 16) return m;
  int64_t p = 1;
  while (p < m) p <<= 1;
  int64_t step = p / 8;
  return (m + step - 1) / step * step;
}

// A planned matmul for one (rows, in, out, bias) shape. A oneDNN primitive holds no data, so
// every layer of that shape shares it (each plan costs ~90 KB of generated code).
struct Plan {
  dnnl::memory::desc src_md, dst_md, weights_md;
  dnnl::matmul matmul;
};

using PlanKey = std::tuple<int64_t, int64_t, int64_t, bool>;
std::mutex g_plans_mutex;
std::map<PlanKey, std::shared_ptr<Plan>> g_plans;

dnnl::memory::desc bias_md(int64_t out) { return dnnl::memory::desc({1, out}, dt::f32, tag::ab); }

dnnl::matmul::primitive_desc make_pd(int64_t rows, int64_t in, int64_t out, bool bias,
                                     const dnnl::memory::desc& weights_md) {
  dnnl::memory::desc src_md({rows, in}, dt::bf16, tag::ab);
  dnnl::memory::desc dst_md({rows, out}, dt::f32, tag::ab);
#if DNNL_VERSION_MAJOR >= 3
  if (bias) return {cpu_engine(), src_md, weights_md, bias_md(out), dst_md};
  return {cpu_engine(), src_md, weights_md, dst_md};
#else
  if (bias) return {dnnl::matmul::desc(src_md, weights_md, bias_md(out), dst_md), cpu_engine()};
  return {dnnl::matmul::desc(src_md, weights_md, dst_md), cpu_engine()};
#endif
}

std::string isa_name() {
  switch (dnnl::get_effective_cpu_isa()) {
    case dnnl::cpu_isa::sse41: return "sse41";
    case dnnl::cpu_isa::avx: return "avx";
    case dnnl::cpu_isa::avx2: return "avx2";
    case dnnl::cpu_isa::avx512_core: return "avx512_core";
    case dnnl::cpu_isa::avx512_core_vnni: return "avx512_core_vnni";
    case dnnl::cpu_isa::avx512_core_bf16: return "avx512_core_bf16";
    case dnnl::cpu_isa::avx512_core_amx: return "avx512_core_amx";
    default: return "other";
  }
}

// Whether oneDNN has any bf16 matmul for this CPU: native (AVX512-BF16, AMX) or emulated
// (AVX512 without bf16). On AVX2 alone, oneDNN 2.x has none and every layer would fail.
bool bf16_runnable() {
  static const bool runnable = [] {
    try {
      dnnl::memory::desc any({64, 64}, dt::bf16, tag::any);
      make_pd(16, 64, 64, false, any);
      return true;
    } catch (const dnnl::error&) {
      return false;
    }
  }();
  return runnable;
}

// The plan for this shape; `packed_md` is the layout the caller's weight is packed in, which
// the plan takes when its kernel accepts it.
std::shared_ptr<Plan> plan_for(int64_t rows, int64_t in, int64_t out, bool bias,
                               const dnnl::memory::desc& packed_md) {
  PlanKey key{rows, in, out, bias};
  std::lock_guard<std::mutex> lock(g_plans_mutex);
  auto it = g_plans.find(key);
  if (it != g_plans.end()) return it->second;
  dnnl::memory::desc any({in, out}, dt::bf16, tag::any);
  auto pd = make_pd(rows, in, out, bias, any);
  if (pd.weights_desc() != packed_md) {
    try {
      pd = make_pd(rows, in, out, bias, packed_md);
    } catch (const dnnl::error&) {
      // Keep the kernel's own layout: layers reorder their weight to it once (below).
    }
  }
  auto plan = std::make_shared<Plan>(Plan{pd.src_desc(), pd.dst_desc(), pd.weights_desc(),
                                          dnnl::matmul(pd)});
  g_plans.emplace(key, plan);
  return plan;
}

size_t plan_count() {
  std::lock_guard<std::mutex> lock(g_plans_mutex);
  return g_plans.size();
}

// The packed weight. Owned from C++ only (see PackedLinear below): MLX's graph and its CPU
// stream thread hold it, and must never hold a Python reference.
class PackedWeight {
 public:
  PackedWeight(mx::array weight, std::optional<mx::array> bias) {
    if (weight.ndim() != 2) throw std::invalid_argument("weight must be (out, in)");
    if (!bf16_runnable()) {
      throw std::runtime_error("oneDNN has no bf16 matmul for this CPU (its ISA: " + isa_name() +
                               ")");
    }
    out_ = weight.shape(0);
    in_ = weight.shape(1);
    weight = mx::contiguous(mx::astype(weight, mx::float32));
    mx::eval(weight);
    std::vector<uint16_t> plain(static_cast<size_t>(out_ * in_));
    convert(weight.data<float>(), plain.data(), out_ * in_);
    if (bias) {
      if (bias->ndim() != 1 || bias->shape(0) != out_)
        throw std::invalid_argument("bias must be (out,)");
      mx::array b = mx::contiguous(mx::astype(*bias, mx::float32));
      mx::eval(b);
      bias_.assign(b.data<float>(), b.data<float>() + out_);
    }
    // W (out, in) row-major is the (in, out) weights matrix in "ba" order.
    dnnl::memory::desc user_md({in_, out_}, dt::bf16, tag::ba);
    dnnl::memory::desc any({in_, out_}, dt::bf16, tag::any);
    packed_md_ = make_pd(256, in_, out_, has_bias(), any).weights_desc();
    packed_ = dnnl::memory(packed_md_, cpu_engine());
    dnnl::memory user(user_md, cpu_engine(), plain.data());
    dnnl::stream s(cpu_engine());
    dnnl::reorder(user, packed_).execute(s, user, packed_);
    s.wait();
  }

  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }
  bool has_bias() const { return !bias_.empty(); }
  size_t nbytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t total = packed_md_.get_size() + bias_.size() * sizeof(float);
    for (auto& [md, mem] : relaid_) total += md.get_size();
    return total;
  }

  // y (m, out) = x (m, in) @ W.T + b; `y` has room for bucket_rows(m) rows.
  void run(const float* x, float* y, int64_t m) {
    int64_t rows = bucket_rows(m);
    std::shared_ptr<Plan> plan = plan_for(rows, in_, out_, has_bias(), packed_md_);
    dnnl::memory weights = weights_for(plan->weights_md);
    thread_local std::vector<uint16_t> scratch;
    size_t need = static_cast<size_t>(rows * in_);
    if (scratch.size() < need) scratch.resize(need);
    convert(x, scratch.data(), m * in_);
    if (rows > m) {
      std::memset(scratch.data() + m * in_, 0, (rows - m) * in_ * sizeof(uint16_t));
    }
    apply_threads();
    dnnl::memory src(plan->src_md, cpu_engine(), scratch.data());
    dnnl::memory dst(plan->dst_md, cpu_engine(), y);
    std::unordered_map<int, dnnl::memory> args{
        {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst}};
    if (has_bias()) {
      args.emplace(DNNL_ARG_BIAS, dnnl::memory(bias_md(out_), cpu_engine(), bias_.data()));
    }
    thread_local std::unique_ptr<dnnl::stream> stream;
    if (!stream) stream = std::make_unique<dnnl::stream>(cpu_engine());
    plan->matmul.execute(*stream, args);
    stream->wait();
  }

 private:
  // The weight in `md`: the packed one, or (rarely) a copy relaid once for another kernel.
  dnnl::memory weights_for(const dnnl::memory::desc& md) {
    if (md == packed_md_) return packed_;
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [have, mem] : relaid_) {
      if (have == md) return mem;
    }
    dnnl::memory mem(md, cpu_engine());
    dnnl::stream s(cpu_engine());
    dnnl::reorder(packed_, mem).execute(s, packed_, mem);
    s.wait();
    relaid_.emplace_back(md, mem);
    return mem;
  }

  int64_t in_ = 0, out_ = 0;
  std::vector<float> bias_;
  dnnl::memory::desc packed_md_;
  dnnl::memory packed_;
  std::mutex mutex_;
  std::vector<std::pair<dnnl::memory::desc, dnnl::memory>> relaid_;
};

// What Python holds: a handle to a C++-owned PackedWeight. A std::shared_ptr that nanobind
// makes from a Python object releases it under the GIL; if the last copy of one died on MLX's
// CPU stream thread (the primitive and the dispatched task below keep copies) while the
// Python thread held the GIL waiting for that eval, the process would deadlock.
class PackedLinear {
 public:
  PackedLinear(mx::array weight, std::optional<mx::array> bias)
      : weight_(std::make_shared<PackedWeight>(std::move(weight), std::move(bias))) {}
  const std::shared_ptr<PackedWeight>& weight() const { return weight_; }
  int64_t in_features() const { return weight_->in_features(); }
  int64_t out_features() const { return weight_->out_features(); }
  bool has_bias() const { return weight_->has_bias(); }
  size_t nbytes() const { return weight_->nbytes(); }

 private:
  std::shared_ptr<PackedWeight> weight_;
};

// ---- The MLX primitive -------------------------------------------------------------------

class Bf16Linear : public mx::UnaryPrimitive {
 public:
  Bf16Linear(mx::Stream stream, std::shared_ptr<PackedWeight> packed)
      : mx::UnaryPrimitive(stream), packed_(std::move(packed)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    int64_t m = x.size() / packed_->in_features();
    int64_t n = packed_->out_features();
    // Room for the padded rows of the matmul's row bucket; the array's shape stays (.., n).
    out.set_data(mx::allocator::malloc(static_cast<size_t>(bucket_rows(m) * n) * sizeof(float)));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_output_array(out);
    encoder.dispatch([x = mx::array::unsafe_weak_copy(x), out = mx::array::unsafe_weak_copy(out),
                      packed = packed_, m]() mutable {
      if (m > 0) packed->run(x.data<float>(), out.data<float>(), m);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[Bf16Linear] runs on the CPU only");
  }

  const char* name() const override { return "Bf16Linear"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const Bf16Linear*>(&other);
    return o != nullptr && o->packed_ == packed_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape shape = inputs[0].shape();
    shape.back() = static_cast<int>(packed_->out_features());
    return {shape};
  }

 private:
  std::shared_ptr<PackedWeight> packed_;
};

mx::array linear(const mx::array& x, const PackedLinear& handle) {
  const std::shared_ptr<PackedWeight>& packed = handle.weight();
  if (x.ndim() < 1 || x.shape(-1) != packed->in_features()) {
    throw std::invalid_argument("linear: the input's last dimension must be " +
                                std::to_string(packed->in_features()));
  }
  mx::Stream s = mx::default_stream(mx::Device(mx::Device::cpu));
  mx::array input = mx::contiguous(mx::astype(x, mx::float32, s), false, s);
  mx::Shape shape = input.shape();
  shape.back() = static_cast<int>(packed->out_features());
  return mx::array(shape, mx::float32, std::make_shared<Bf16Linear>(s, packed), {input});
}

bool bf16_supported() {
  auto isa = dnnl::get_effective_cpu_isa();
  return isa == dnnl::cpu_isa::avx512_core_bf16 || isa == dnnl::cpu_isa::avx512_core_amx;
}

}  // namespace

NB_MODULE(_bf16, m) {
  m.doc() = "bf16 linear layers for MLX's CPU backend (oneDNN matmul)";
  m.def("isa", &isa_name, "oneDNN's effective CPU ISA");
  m.def("bf16_supported", &bf16_supported, "whether the CPU has bf16 dot-product kernels");
  m.def("bf16_runnable", &bf16_runnable,
        "whether oneDNN can run a bf16 matmul here at all (natively or emulated)");
  m.def("mlx_version", [] { return std::string(AKIDB_MLX_VERSION); },
        "the mlx version this module was built against");
  m.def("onednn_version", [] {
    auto v = dnnl::version();
    return std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
           std::to_string(v->patch);
  });
  m.def(
      "set_threads", [](int n) { g_threads.store(n < 1 ? 1 : n); }, "n"_a,
      "threads for the bf16 matmuls");
  m.def("get_threads", [] { return g_threads.load(); });
  nb::class_<PackedLinear>(m, "PackedLinear")
      .def(nb::init<mx::array, std::optional<mx::array>>(), "weight"_a, "bias"_a = nb::none())
      .def_prop_ro("in_features", &PackedLinear::in_features)
      .def_prop_ro("out_features", &PackedLinear::out_features)
      .def_prop_ro("has_bias", &PackedLinear::has_bias)
      .def_prop_ro("nbytes", &PackedLinear::nbytes);
  m.def("plan_count", &plan_count, "matmul shapes planned so far, shared by all layers");
  m.def("linear", &linear, "x"_a, "packed"_a, "x @ weight.T + bias in bf16 (fp32 in and out)");
}
