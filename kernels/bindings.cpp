// The one pybind11 module, minipt._C.
//
// Bindings take raw device or host pointers, shapes and (for CUDA) the stream as
// integers. The Python side (each op's native wrapper, through minipt/ops/_native.py)
// validates tensors and passes data_ptr(); this keeps the extension free of libtorch,
// so it builds in seconds and in an isolated build environment that has no torch.
//
// Every binding checks what it can see (sizes, dtype codes, null or misaligned
// addresses, option ranges) before touching memory, and raises ValueError with the
// argument's name; a CUDA launch failure raises RuntimeError with CUDA's message.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include "ops.h"
#include "philox.h"

namespace py = pybind11;
using namespace minipt;

namespace {

constexpr int MAX_THREADS = 4096;

int64_t float_size(FloatType t) { return t == FloatType::f32 ? 4 : 2; }

void check_aligned(uintptr_t ptr, int64_t size, const char* op, const char* arg) {
  check(ptr % static_cast<uintptr_t>(size) == 0, op,
        std::string(arg) + " address is not aligned to its " + std::to_string(size) + "-byte elements");
}

void check_tensor(uintptr_t ptr, int64_t numel, int64_t elem_size, const char* op, const char* arg) {
  check_ptr(ptr, numel, op, arg);
  check_aligned(ptr, elem_size, op, arg);
}

// n_rows·n_classes and friends must fit int64 for the kernels' offsets.
void check_product(int64_t a, int64_t b, const char* op, const char* what) {
  check(b == 0 || a <= std::numeric_limits<int64_t>::max() / b, op, std::string(what) + " overflows int64");
}

void check_threads(int num_threads, const char* op) {
  check(num_threads >= 1 && num_threads <= MAX_THREADS, op,
        "num_threads must be in [1, " + std::to_string(MAX_THREADS) + "], got " + std::to_string(num_threads));
}

// A kernel binds once per device, written once as a template over it:
// `<kernel>_cpu(..., num_threads=)` runs the C++ kernel, `<kernel>_cuda(..., stream=)`
// queues the CUDA kernel on a stream. All that differs between the two lives in the
// device's struct: the last argument, its check, and each kernel's launch. Neither
// launch needs Python, so both run without the GIL.
struct Cpu {
  using Handle = int;
  static constexpr const char *suffix = "_cpu", *handle = "num_threads";
  static void check(int num_threads, const char* op) { check_threads(num_threads, op); }
  static int64_t ce_forward(const CrossEntropyArgs& a, uintptr_t loss, int64_t* first_bad, int num_threads) {
    return cross_entropy_forward_cpu(a, loss, num_threads, first_bad);
  }
  static void ce_backward(const CrossEntropyArgs& a, uintptr_t grad_rows, uintptr_t grad_logits, int num_threads) {
    cross_entropy_backward_cpu(a, grad_rows, grad_logits, num_threads);
  }
  static void mlm_mask(const MlmMaskArgs& a, int num_threads) { mlm_mask_cpu(a, num_threads); }
  static void check_head_dim(int64_t head_dim, const char* op) {
    minipt::check(head_dim >= 1, op, "head_dim must be >= 1, got " + std::to_string(head_dim));
  }
  static constexpr bool any_qkv_strides = true;
  static void attention_forward(const AttentionArgs& a, int num_threads) { attention_forward_cpu(a, num_threads); }
  static void attention_backward(const AttentionArgs& a, const AttentionGrads& g, int num_threads) {
    attention_backward_cpu(a, g, num_threads);
  }
};

#ifdef MINIPT_WITH_CUDA
struct Cuda {
  using Handle = uintptr_t;
  static constexpr const char *suffix = "_cuda", *handle = "stream";
  // The CUDA entry points check that every pointer is memory of the current device
  // (cuda_common.cuh) before a kernel can touch it.
  static void check(uintptr_t, const char*) {}
  // A kernel cannot raise: a row whose target is out of range gets a NaN loss instead.
  static int64_t ce_forward(const CrossEntropyArgs& a, uintptr_t loss, int64_t*, uintptr_t stream) {
    cross_entropy_forward_cuda(a, loss, stream);
    return 0;
  }
  static void ce_backward(const CrossEntropyArgs& a, uintptr_t grad_rows, uintptr_t grad_logits, uintptr_t stream) {
    cross_entropy_backward_cuda(a, grad_rows, grad_logits, stream);
  }
  static void mlm_mask(const MlmMaskArgs& a, uintptr_t stream) { mlm_mask_cuda(a, stream); }
  static void check_head_dim(int64_t head_dim, const char* op) {
    minipt::check(head_dim == 64 || head_dim == 128, op,
                  "head_dim must be 64 or 128, got " + std::to_string(head_dim));
  }
  static constexpr bool any_qkv_strides = false;  // dense (B, H, T, D) q, k and v
  static void attention_forward(const AttentionArgs& a, uintptr_t stream) { attention_forward_cuda(a, stream); }
  static void attention_backward(const AttentionArgs& a, const AttentionGrads& g, uintptr_t stream) {
    attention_backward_cuda(a, g, stream);
  }
};
#endif

CrossEntropyArgs ce_args(uintptr_t logits, uintptr_t target, uintptr_t lse, int64_t n_rows, int64_t n_classes,
                         int dtype, int64_t target_size, int64_t ignore_index, double label_smoothing,
                         double softcap, double z_loss) {
  const char* op = "cross_entropy";
  check(n_rows >= 0, op, "n_rows must be >= 0, got " + std::to_string(n_rows));
  check(n_classes >= 1, op, "n_classes must be >= 1, got " + std::to_string(n_classes));
  check_product(n_rows, n_classes, op, "n_rows * n_classes");
  check(std::isfinite(label_smoothing) && label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
        "label_smoothing must be in [0, 1], got " + std::to_string(label_smoothing));
  // float32 is what the kernels compute in: a cap below its smallest normal would divide to inf.
  check(std::isfinite(softcap) && (softcap == 0.0 || (softcap >= std::numeric_limits<float>::min() &&
                                                      softcap <= std::numeric_limits<float>::max())),
        op, "softcap must be 0 (none) or a positive finite float32, got " + std::to_string(softcap));
  check(std::isfinite(z_loss) && z_loss >= 0.0 && z_loss <= std::numeric_limits<float>::max(), op,
        "z_loss must be a finite float32 >= 0, got " + std::to_string(z_loss));
  const FloatType t = float_type(dtype, op, "logits");
  check_int_size(target_size, op, "target", false);
  check_tensor(logits, n_rows * n_classes, float_size(t), op, "logits");
  check_tensor(target, n_rows, target_size, op, "target");
  check_tensor(lse, n_rows, 4, op, "lse");
  return CrossEntropyArgs{logits, target, lse, n_rows, n_classes, t, target_size, ignore_index,
                          static_cast<float>(label_smoothing), static_cast<float>(softcap),
                          static_cast<float>(z_loss)};
}

template <class Device>
void ce_forward(uintptr_t logits, uintptr_t target, uintptr_t loss, uintptr_t lse, int64_t n_rows, int64_t n_classes,
                int dtype, int64_t target_size, int64_t ignore_index, double label_smoothing, double softcap,
                double z_loss, typename Device::Handle handle) {
  const CrossEntropyArgs a = ce_args(logits, target, lse, n_rows, n_classes, dtype, target_size, ignore_index,
                                     label_smoothing, softcap, z_loss);
  check_tensor(loss, n_rows, 4, "cross_entropy", "loss");
  Device::check(handle, "cross_entropy");
  int64_t first_bad = -1, n_bad = 0;
  {
    py::gil_scoped_release release;
    n_bad = Device::ce_forward(a, loss, &first_bad, handle);
  }
  if (n_bad > 0) {
    throw std::invalid_argument("cross_entropy: " + std::to_string(n_bad) + " target(s) outside [0, " +
                                std::to_string(n_classes) + ") and not ignore_index=" +
                                std::to_string(ignore_index) + ", first at row " + std::to_string(first_bad));
  }
}

template <class Device>
void ce_backward(uintptr_t logits, uintptr_t target, uintptr_t lse, uintptr_t grad_rows, uintptr_t grad_logits,
                 int64_t n_rows, int64_t n_classes, int dtype, int64_t target_size, int64_t ignore_index,
                 double label_smoothing, double softcap, double z_loss, typename Device::Handle handle) {
  const CrossEntropyArgs a = ce_args(logits, target, lse, n_rows, n_classes, dtype, target_size, ignore_index,
                                     label_smoothing, softcap, z_loss);
  check_tensor(grad_rows, n_rows, 4, "cross_entropy", "grad_rows");
  check_tensor(grad_logits, n_rows * n_classes, float_size(a.dtype), "cross_entropy", "grad_logits");
  Device::check(handle, "cross_entropy");
  py::gil_scoped_release release;
  Device::ce_backward(a, grad_rows, grad_logits, handle);
}

template <class Device>
void mlm_mask_binding(uintptr_t input_ids, uintptr_t special, uintptr_t masked, uintptr_t labels, int64_t numel,
                      int64_t id_size, int64_t special_size, int64_t mask_token_id, int64_t vocab_size,
                      double mlm_probability, uint64_t seed, typename Device::Handle handle) {
  const char* op = "mlm_mask";
  check(numel >= 0, op, "numel must be >= 0, got " + std::to_string(numel));
  check_int_size(id_size, op, "input_ids", false);
  const int64_t max_vocab = id_size == 4 ? int64_t{1} << 31 : std::numeric_limits<int64_t>::max();
  check(vocab_size >= 1 && vocab_size <= max_vocab, op,
        "vocab_size must be in [1, " + std::to_string(max_vocab) + "] for " + std::to_string(id_size) +
            "-byte ids, got " + std::to_string(vocab_size));
  check(mask_token_id >= 0 && mask_token_id < vocab_size, op,
        "mask_token_id must be in [0, vocab_size), got " + std::to_string(mask_token_id));
  check(std::isfinite(mlm_probability) && mlm_probability >= 0.0 && mlm_probability <= 1.0, op,
        "mlm_probability must be in [0, 1], got " + std::to_string(mlm_probability));
  check_tensor(input_ids, numel, id_size, op, "input_ids");
  check_tensor(masked, numel, id_size, op, "masked");
  check_tensor(labels, numel, id_size, op, "labels");
  if (special != 0) {
    check_int_size(special_size, op, "special_tokens_mask", true);
    check_tensor(special, numel, special_size, op, "special_tokens_mask");
  }
  Device::check(handle, op);
  const MlmMaskArgs a{input_ids, special, masked, labels, numel, id_size, special_size, mask_token_id,
                      vocab_size, static_cast<float>(mlm_probability), seed};
  py::gil_scoped_release release;
  Device::mlm_mask(a, handle);
}

py::tuple philox_binding(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key) {
  const Philox4 r = philox4x32_10(Philox4{{counter[0], counter[1], counter[2], counter[3]}}, key[0], key[1]);
  return py::make_tuple(r.v[0], r.v[1], r.v[2], r.v[3]);
}

template <class Device>
AttentionArgs attention_args(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t key_mask,
                             uintptr_t doc_span, int64_t batch, int64_t heads, int64_t seq_len, int64_t head_dim,
                             int dtype, bool is_causal, double scale, int64_t window_left, int64_t window_right,
                             int64_t stride_b, int64_t stride_h, int64_t stride_t, typename Device::Handle handle) {
  const char* op = "attention";
  check(batch >= 0 && heads >= 0 && seq_len >= 0, op,
        "batch, heads and seq_len must be >= 0, got " + std::to_string(batch) + ", " + std::to_string(heads) + ", " +
            std::to_string(seq_len));
  Device::check_head_dim(head_dim, op);
  check(std::isfinite(scale), op, "scale must be finite, got " + std::to_string(scale));
  check(window_left >= -1 && window_right >= -1, op,
        "window_left and window_right must be >= 0, or -1 for an unbounded side, got " + std::to_string(window_left) +
            ", " + std::to_string(window_right));
  check_product(batch, heads, op, "batch * heads");
  check_product(batch * heads, seq_len, op, "batch * heads * seq_len");
  check_product(batch * heads * seq_len, head_dim, op, "batch * heads * seq_len * head_dim");
  // doc_span holds positions as int32.
  check(seq_len <= std::numeric_limits<int32_t>::max(), op, "seq_len must fit int32, got " + std::to_string(seq_len));
  const FloatType t = float_type(dtype, op, "q, k, v");
  const int64_t n = batch * heads * seq_len * head_dim;
  const bool dense = stride_b == heads * seq_len * head_dim && stride_h == seq_len * head_dim && stride_t == head_dim;
  check(Device::any_qkv_strides || dense, op,
        "q, k and v must be dense (B, H, T, D) here, got strides (" + std::to_string(stride_b) + ", " +
            std::to_string(stride_h) + ", " + std::to_string(stride_t) + ", 1)");
  check(stride_b >= 0 && stride_h >= 0 && stride_t >= 0, op, "the strides of q, k and v must be >= 0");
  // The elements q, k and v span: the last one's offset plus one, as rows of head_dim.
  int64_t span = n == 0 ? 0 : head_dim;
  for (const auto& [extent, stride] : {std::pair{batch, stride_b}, std::pair{heads, stride_h},
                                       std::pair{seq_len, stride_t}}) {
    check_product(extent > 0 ? extent - 1 : 0, stride, op, "the strides of q, k and v");
    if (n != 0) span += (extent - 1) * stride;
  }
  for (const auto& [ptr, name] : {std::pair{q, "q"}, std::pair{k, "k"}, std::pair{v, "v"}}) {
    check_tensor(ptr, span, float_size(t), op, name);
  }
  check_tensor(out, n, float_size(t), op, "out");
  check_tensor(lse, batch * heads * seq_len, 4, op, "lse");
  if (doc_span != 0) check_tensor(doc_span, batch * 2 * seq_len, 4, op, "doc_span");
  Device::check(handle, op);
  return AttentionArgs{q, k, v, out, lse, key_mask, doc_span, batch, heads, seq_len, head_dim, t, is_causal,
                       static_cast<float>(scale), window_left, window_right, stride_b, stride_h, stride_t};
}

template <class Device>
void attention_forward_binding(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                               uintptr_t key_mask, uintptr_t doc_span, int64_t batch, int64_t heads, int64_t seq_len,
                               int64_t head_dim, int dtype, bool is_causal, double scale, int64_t window_left,
                               int64_t window_right, int64_t stride_b, int64_t stride_h, int64_t stride_t,
                               typename Device::Handle handle) {
  const AttentionArgs a = attention_args<Device>(q, k, v, out, lse, key_mask, doc_span, batch, heads, seq_len,
                                                 head_dim, dtype, is_causal, scale, window_left, window_right,
                                                 stride_b, stride_h, stride_t, handle);
  py::gil_scoped_release release;
  Device::attention_forward(a, handle);
}

template <class Device>
void attention_backward_binding(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                                uintptr_t key_mask, uintptr_t doc_span, uintptr_t grad_out, uintptr_t delta,
                                uintptr_t grad_q, uintptr_t grad_k, uintptr_t grad_v, int64_t batch, int64_t heads,
                                int64_t seq_len, int64_t head_dim, int dtype, bool is_causal, double scale,
                                int64_t window_left, int64_t window_right, int64_t stride_b, int64_t stride_h,
                                int64_t stride_t, typename Device::Handle handle) {
  const AttentionArgs a = attention_args<Device>(q, k, v, out, lse, key_mask, doc_span, batch, heads, seq_len,
                                                 head_dim, dtype, is_causal, scale, window_left, window_right,
                                                 stride_b, stride_h, stride_t, handle);
  const int64_t n = batch * heads * seq_len * head_dim;
  for (const auto& [ptr, name] : {std::pair{grad_out, "grad_out"}, std::pair{grad_q, "grad_q"},
                                  std::pair{grad_k, "grad_k"}, std::pair{grad_v, "grad_v"}}) {
    check_tensor(ptr, n, float_size(a.dtype), "attention", name);
  }
  check_tensor(delta, batch * heads * seq_len, 4, "attention", "delta");
  py::gil_scoped_release release;
  Device::attention_backward(a, AttentionGrads{grad_out, delta, grad_q, grad_k, grad_v}, handle);
}

// Binds `<kernel>_cpu` or `<kernel>_cuda`: the kernel's keyword arguments, then the device's.
template <class Device, class Fn, class... Args>
void def_on(py::module_& m, const std::string& kernel, Fn fn, const std::string& doc, const Args&... args) {
  m.def((kernel + Device::suffix).c_str(), fn, doc.c_str(), args..., py::arg(Device::handle));
}

template <class Device>
void def_kernels(py::module_& m) {
  def_on<Device>(m, "cross_entropy_forward", &ce_forward<Device>, "Per-row loss and lse of (N, V) logits",
                 py::arg("logits"), py::arg("target"), py::arg("loss"), py::arg("lse"), py::arg("n_rows"),
                 py::arg("n_classes"), py::arg("dtype"), py::arg("target_size"), py::arg("ignore_index"),
                 py::arg("label_smoothing"), py::arg("softcap"), py::arg("z_loss"));
  def_on<Device>(m, "cross_entropy_backward", &ce_backward<Device>, "Gradient of the per-row losses wrt the logits",
                 py::arg("logits"), py::arg("target"), py::arg("lse"), py::arg("grad_rows"), py::arg("grad_logits"),
                 py::arg("n_rows"), py::arg("n_classes"), py::arg("dtype"), py::arg("target_size"),
                 py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("softcap"), py::arg("z_loss"));
  def_on<Device>(m, "mlm_mask", &mlm_mask_binding<Device>, "BERT's MLM masking of n ids (special: 0 for none)",
                 py::arg("input_ids"), py::arg("special"), py::arg("masked"), py::arg("labels"), py::arg("numel"),
                 py::arg("id_size"), py::arg("special_size"), py::arg("mask_token_id"), py::arg("vocab_size"),
                 py::arg("mlm_probability"), py::arg("seed"));
  def_on<Device>(m, "attention_forward", &attention_forward_binding<Device>,
                 "Flash-style attention forward: out in (B, T, H, D) memory and base-2 lse (B, H, T)", py::arg("q"),
                 py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("key_mask"), py::arg("doc_span"),
                 py::arg("batch"), py::arg("heads"), py::arg("seq_len"), py::arg("head_dim"), py::arg("dtype"),
                 py::arg("is_causal"), py::arg("scale"), py::arg("window_left"), py::arg("window_right"),
                 py::arg("stride_b"), py::arg("stride_h"), py::arg("stride_t"));
  def_on<Device>(m, "attention_backward", &attention_backward_binding<Device>,
                 "Attention backward: dq, dk, dv from dout, with delta (B, H, T) as float32 scratch", py::arg("q"),
                 py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("key_mask"),
                 py::arg("doc_span"), py::arg("grad_out"), py::arg("delta"), py::arg("grad_q"), py::arg("grad_k"),
                 py::arg("grad_v"), py::arg("batch"), py::arg("heads"), py::arg("seq_len"), py::arg("head_dim"),
                 py::arg("dtype"), py::arg("is_causal"), py::arg("scale"), py::arg("window_left"),
                 py::arg("window_right"), py::arg("stride_b"), py::arg("stride_h"), py::arg("stride_t"));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "minipt native kernels (C++ for the CPU, CUDA when built with it)";
  m.def("philox4x32_10", &philox_binding, "Philox4x32-10 of a counter under a key (for known-answer tests)",
        py::arg("counter"), py::arg("key"));
  def_kernels<Cpu>(m);
  m.attr("attention_cpu_tile") = py::make_tuple(ATTENTION_CPU_BLOCK_Q, ATTENTION_CPU_BLOCK_K);
#ifdef MINIPT_WITH_CUDA
  m.attr("has_cuda") = true;
  def_kernels<Cuda>(m);
#else
  m.attr("has_cuda") = false;
#endif
}
