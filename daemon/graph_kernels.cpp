// agentd's few-row attention and SwiGLU as MLX primitives: nodes of MLX's graph.
//
// The kernels themselves are `agentd_attention` and `agentd_swiglu` in gemv_forward.c, the
// library the daemon preloads in front of OpenBLAS; agentd.fewattn hands this module their
// addresses (`bind`) and it wraps each in an `mlx::core::Primitive` whose `eval_cpu` queues the call on the stream's
// thread, after the node's inputs and before whatever reads its output. Called through
// ctypes instead, a kernel needs its inputs evaluated first: a forward pass becomes one MLX
// evaluation per layer (~0.1 ms each, and the graph of the next layer is not built while
// one runs), which made the kernel a loss for decode steps. As nodes they cost nothing of
// the kind, so a decode step -- one query row per sequence, batched or not -- takes the
// kernel's vectorised softmax instead of MLX's `exp` of one element at a time.
//
// One more function rides along: `unwritten`, a restore's new arrays with no bytes written
// (agentd.restore_arrays), which Python can only get from `mx.load`, at ~70 us an array.
//
// Built by agentd.graph_kernels with the system C++ compiler against the installed MLX's
// headers and libmlx, and nanobind's sources in MLX's nanobind domain ("mlx"), so that
// `mlx.core.array` arguments convert to `mlx::core::array`.

#include <cstdint>
#include <array>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

using AttentionKernel = int (*)(int, int, int, int, int, int, int, const float*, const long long*,
                                const float*, const long long*, const float*, const long long*,
                                float, int, const void*, const long long*, float*);
using SwigluKernel = void (*)(long long, const float*, const float*, float*);

AttentionKernel attention_kernel = nullptr;
SwigluKernel swiglu_kernel = nullptr;

// gemv_forward.c's mask kinds.
enum MaskKind { MASK_NONE = 0, MASK_CAUSAL = 1, MASK_BOOL = 2, MASK_ADD = 3 };

mx::Stream cpu_stream() { return mx::default_stream(mx::Device::cpu); }

// A float32 tensor of 4 axes, as plain values the stream's thread can read after the graph
// that held the array is gone (MLX keeps the buffers alive until the queued work has run).
struct View {
  const float* data;
  long long shape[4], strides[4];
  explicit View(const mx::array& a) : data(a.data<float>()) {
    for (int i = 0; i < 4; i++) shape[i] = a.shape(i), strides[i] = a.strides()[i];
  }
  // Its data as the kernel reads it: the last axis dense, the other axes' strides (in
  // elements) in `out`. When the last axis is strided (no caller of agentd's does that
  // today), a dense copy in `scratch`.
  const float* dense_last(std::vector<float>& scratch, long long out[3]) const {
    if (shape[3] == 1 || strides[3] == 1) {
      for (int i = 0; i < 3; i++) out[i] = strides[i];
      return data;
    }
    scratch.resize(shape[0] * shape[1] * shape[2] * shape[3]);
    size_t at = 0;
    for (long long i0 = 0; i0 < shape[0]; i0++)
      for (long long i1 = 0; i1 < shape[1]; i1++)
        for (long long i2 = 0; i2 < shape[2]; i2++)
          for (long long i3 = 0; i3 < shape[3]; i3++)
            scratch[at++] = data[i0 * strides[0] + i1 * strides[1] + i2 * strides[2] + i3 * strides[3]];
    out[0] = shape[1] * shape[2] * shape[3];
    out[1] = shape[2] * shape[3];
    out[2] = shape[3];
    return scratch.data();
  }
};

class Attention : public mx::UnaryPrimitive {
 public:
  Attention(mx::Stream stream, float scale, int mask_kind)
      : mx::UnaryPrimitive(stream), scale_(scale), mask_kind_(mask_kind) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto &q = inputs[0], &k = inputs[1], &v = inputs[2];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    const void* mask = nullptr;
    std::array<long long, 4> mask_strides{0, 0, 0, 0};
    if (mask_kind_ >= MASK_BOOL) {
      const auto& m = inputs[3];  // broadcast to B x Hq x Lq x Lk by the builder
      mask = m.data<void>();
      for (int i = 0; i < 4; i++) mask_strides[i] = m.strides()[i];
    }
    encoder.dispatch([q = View(q), k = View(k), v = View(v), out_ptr = out.data<float>(), mask,
                      mask_strides, scale = scale_, kind = mask_kind_]() {
      std::vector<float> qc, kc, vc;
      long long qs[3], ks[3], vs[3];
      const float* qp = q.dense_last(qc, qs);
      const float* kp = k.dense_last(kc, ks);
      const float* vp = v.dense_last(vc, vs);
      attention_kernel(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3],
                       v.shape[3], qp, qs, kp, ks, vp, vs, scale, kind, mask,
                       mask_strides.data(), out_ptr);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("agentd's attention kernel runs on the CPU only");
  }
  const char* name() const override { return "AgentdAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const Attention&>(other);
    return scale_ == o.scale_ && mask_kind_ == o.mask_kind_;
  }

 private:
  float scale_;
  int mask_kind_;
};

class Swiglu : public mx::UnaryPrimitive {
 public:
  explicit Swiglu(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto &gate = inputs[0], &up = inputs[1];  // row-contiguous: the builder makes them so
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(gate);
    encoder.set_input_array(up);
    encoder.set_output_array(out);
    encoder.dispatch([g = gate.data<float>(), u = up.data<float>(), o = out.data<float>(),
                      n = (long long)out.size()]() { swiglu_kernel(n, g, u, o); });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("agentd's SwiGLU kernel runs on the CPU only");
  }
  const char* name() const override { return "AgentdSwiglu"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

void require_bound() {
  if (attention_kernel == nullptr || swiglu_kernel == nullptr)
    throw std::runtime_error("agentd's graph kernels are not bound to the few-row library");
}

// softmax(scale Q K^T + mask) V as MLX's scaled_dot_product_attention computes it, shape
// B x Hq x Lq x Dv (a transposed view of the kernel's B x Lq x Hq x Dv).
mx::array attention(const mx::array& queries, const mx::array& keys, const mx::array& values,
                    float scale, int mask_kind, std::optional<mx::array> mask) {
  require_bound();
  require(queries.ndim() == 4 && keys.ndim() == 4 && values.ndim() == 4, "4-axis tensors only");
  require(queries.dtype() == mx::float32 && keys.dtype() == mx::float32 &&
              values.dtype() == mx::float32,
          "float32 only");
  int b = queries.shape(0), hq = queries.shape(1), lq = queries.shape(2), d = queries.shape(3);
  int hkv = keys.shape(1), lk = keys.shape(2), dv = values.shape(3);
  require(keys.shape(0) == b && values.shape(0) == b && keys.shape(3) == d &&
              values.shape(1) == hkv && values.shape(2) == lk && hkv >= 1 && hq % hkv == 0 &&
              lq >= 1 && lk >= 1,
          "shapes the kernel does not take");
  std::vector<mx::array> inputs{queries, keys, values};
  auto stream = cpu_stream();
  if (mask_kind == MASK_BOOL || mask_kind == MASK_ADD) {
    require(mask.has_value(), "an array mask needs the array");
    mx::array m = *mask;
    if (m.dtype() == mx::bool_) {
      mask_kind = MASK_BOOL;
    } else {
      require(mx::issubdtype(m.dtype(), mx::floating), "a mask is boolean or floating");
      mask_kind = MASK_ADD;
      if (m.dtype() != mx::float32) m = mx::astype(m, mx::float32, stream);
    }
    inputs.push_back(mx::broadcast_to(m, {b, hq, lq, lk}, stream));
  } else {
    require(mask_kind == MASK_NONE || mask_kind == MASK_CAUSAL, "unknown mask kind");
  }
  mx::array out({b, lq, hq, dv}, mx::float32,
                std::make_shared<Attention>(stream, scale, mask_kind), std::move(inputs));
  return mx::transpose(out, {0, 2, 1, 3}, stream);
}

// silu(gate) * up, elementwise, as mlx-lm's swiglu.
mx::array swiglu(const mx::array& gate, const mx::array& up) {
  require_bound();
  require(gate.dtype() == mx::float32 && up.dtype() == mx::float32, "float32 only");
  require(gate.shape() == up.shape(), "gate and up of one shape");
  auto stream = cpu_stream();
  return mx::array(gate.shape(), mx::float32, std::make_shared<Swiglu>(stream),
                   {mx::contiguous(gate, false, stream), mx::contiguous(up, false, stream)});
}

// Evaluated arrays whose memory nothing has written, from MLX's own allocator (so its buffer
// cache hands a restore the memory the last one freed): a restore's reads then write every
// byte once. The Python way to get them, `mx.load` of a header with no data, costs ~70 us an
// array (4.3 ms of a 12 ms restore of 60 arrays); this costs a malloc each.
std::vector<mx::array> unwritten(const std::vector<std::vector<int>>& shapes, const std::vector<mx::Dtype>& dtypes) {
  require(shapes.size() == dtypes.size(), "one dtype a shape");
  std::vector<mx::array> out;
  out.reserve(shapes.size());
  for (size_t i = 0; i < shapes.size(); i++) {
    size_t nbytes = dtypes[i].size();
    for (int d : shapes[i]) {
      require(d >= 0, "a negative dimension");
      nbytes *= static_cast<size_t>(d);
    }
    out.emplace_back(mx::allocator::malloc(nbytes), mx::Shape(shapes[i].begin(), shapes[i].end()), dtypes[i]);
  }
  return out;
}

}  // namespace

NB_MODULE(_agentd_graph_kernels, m) {
  nb::module_::import_("mlx.core");  // registers mlx::core::array in the shared domain
  // The addresses of `agentd_attention` and `agentd_swiglu` in the few-row library, which
  // stays mapped for the life of the process.
  m.def("bind", [](uintptr_t attention, uintptr_t swiglu) {
    attention_kernel = reinterpret_cast<AttentionKernel>(attention);
    swiglu_kernel = reinterpret_cast<SwigluKernel>(swiglu);
  });
  m.def("attention", &attention, nb::arg("queries"), nb::arg("keys"), nb::arg("values"),
        nb::arg("scale"), nb::arg("mask_kind"), nb::arg("mask").none() = nb::none());
  m.def("swiglu", &swiglu, nb::arg("gate"), nb::arg("up"));
  m.def("unwritten", &unwritten, nb::arg("shapes"), nb::arg("dtypes"));
}
