// The one registration point of our torch ops: TORCH_LIBRARY(dspark) with CUDA kernels and Meta
// (fake) implementations, so the ops trace under torch.compile and capture in CUDA graphs.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace dspark {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> markov_chain_cuda(
    const at::Tensor& U, const at::Tensor& anchors, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& temperature, const at::Tensor& seeds, bool return_q, const std::optional<at::Tensor>& conf_h,
    const std::optional<at::Tensor>& conf_weight, const std::optional<at::Tensor>& conf_bias,
    const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p, int64_t top_k_max);

std::tuple<at::Tensor, at::Tensor> rejection_sample_cuda(
    const at::Tensor& target, const std::optional<at::Tensor>& row_start, const at::Tensor& ell,
    const at::Tensor& tokens, const at::Tensor& q_token, const std::optional<at::Tensor>& q,
    const std::optional<at::Tensor>& U, const std::optional<at::Tensor>& anchors, const std::optional<at::Tensor>& w1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& temperature,
    const std::optional<at::Tensor>& greedy, const at::Tensor& seeds, const std::optional<at::Tensor>& row_stats,
    int64_t row_stride, const std::optional<at::Tensor>& block_counter, const std::optional<at::Tensor>& thresholds,
    const std::optional<at::Tensor>& target_argmax, const std::optional<at::Tensor>& target_stats);

at::Tensor schedule_production_cuda(const at::Tensor& a_stale, const at::Tensor& a_now, const at::Tensor& sps_dense,
                                    int64_t sps_limit);

void draft_attention_cuda(const at::Tensor& q, const at::Tensor& k_block, const at::Tensor& v_block,
                          const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& pages,
                          int64_t page_rows, const at::Tensor& lengths, int64_t max_length, const at::Tensor& out);

void softmax_stats_cuda(const at::Tensor& logits, const at::Tensor& stats, const std::optional<at::Tensor>& best);

// Shared memory of one draft_attention CTA for that many query rows per KV head (16-bit dtypes), or
// 0 where the op does not take the shape: cuda_ops.draft_attention_fits asks it of the GPU's limit.
int64_t draft_attention_smem(int64_t query_rows, int64_t head_dim);

// Shapes only: what the CUDA implementations allocate. Every size is a SymInt taken from the
// inputs' sym sizes, so under torch.compile(dynamic=True) the batch size stays symbolic (a concrete
// .size() here would specialize it and recompile for every new R).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> markov_chain_meta(
    const at::Tensor& U, const at::Tensor& anchors, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& temperature, const at::Tensor& seeds, bool return_q, const std::optional<at::Tensor>& conf_h,
    const std::optional<at::Tensor>& conf_weight, const std::optional<at::Tensor>& conf_bias,
    const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p, int64_t top_k_max) {
  const c10::SymInt R = U.sym_size(0), gamma = U.sym_size(1), V = U.sym_size(2), rank = w1.sym_size(1);
  const c10::SymInt zero = 0;
  const bool confidence = conf_h.has_value() && conf_h->defined();
  const bool warped = (top_k.has_value() && top_k->defined()) || (top_p.has_value() && top_p->defined());
  auto f32 = U.options().dtype(at::kFloat);
  return {at::empty_symint({R, gamma}, U.options().dtype(at::kLong)),
          at::empty_symint({R, gamma}, f32),
          return_q ? at::empty_symint({R, gamma, V}, f32) : at::empty_symint({zero}, f32),
          at::empty_symint({R, gamma, rank}, w1.options()),
          at::empty_symint({R, gamma, c10::SymInt(2)}, f32),
          // the CUDA op's block counter is the last of γ + 1 int counters (storage offset γ, so not
          // 16-byte aligned): the same view here, or inductor would assert an alignment it lacks
          at::empty_symint({gamma + 1}, U.options().dtype(at::kInt)).narrow_symint(0, gamma, 1),
          at::empty_symint({confidence ? R : zero, gamma}, f32),
          at::empty_symint({warped ? R : zero, gamma}, f32)};
}

at::Tensor schedule_production_meta(const at::Tensor& a_stale, const at::Tensor& a_now, const at::Tensor& sps_dense,
                                    int64_t sps_limit) {
  return at::empty_symint({a_now.sym_size(0)}, a_now.options().dtype(at::kLong));
}

std::tuple<at::Tensor, at::Tensor> rejection_sample_meta(
    const at::Tensor& target, const std::optional<at::Tensor>& row_start, const at::Tensor& ell,
    const at::Tensor& tokens, const at::Tensor& q_token, const std::optional<at::Tensor>& q,
    const std::optional<at::Tensor>& U, const std::optional<at::Tensor>& anchors, const std::optional<at::Tensor>& w1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& temperature,
    const std::optional<at::Tensor>& greedy, const at::Tensor& seeds, const std::optional<at::Tensor>& row_stats,
    int64_t row_stride, const std::optional<at::Tensor>& block_counter, const std::optional<at::Tensor>& thresholds,
    const std::optional<at::Tensor>& target_argmax, const std::optional<at::Tensor>& target_stats) {
  const c10::SymInt R = tokens.sym_size(0), gamma = tokens.sym_size(1);
  return {at::empty_symint({R, gamma + 1}, tokens.options()), at::empty_symint({R}, tokens.options())};
}

// Writes into `out` only: nothing to allocate.
void draft_attention_meta(const at::Tensor& q, const at::Tensor& k_block, const at::Tensor& v_block,
                          const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& pages,
                          int64_t page_rows, const at::Tensor& lengths, int64_t max_length, const at::Tensor& out) {}

void softmax_stats_meta(const at::Tensor& logits, const at::Tensor& stats, const std::optional<at::Tensor>& best) {}

}  // namespace dspark

TORCH_LIBRARY(dspark, m) {
  m.def(
      "markov_chain(Tensor U, Tensor anchors, Tensor w1, Tensor w2, Tensor temperature, Tensor seeds, "
      "bool return_q, Tensor? conf_h=None, Tensor? conf_weight=None, Tensor? conf_bias=None, Tensor? top_k=None, "
      "Tensor? top_p=None, int top_k_max=0) "
      "-> (Tensor tokens, Tensor q_token, Tensor q, Tensor prev_emb, Tensor row_stats, Tensor block_counter, "
      "Tensor conf_logits, Tensor thresholds)");
  m.def(
      "rejection_sample(Tensor target, Tensor? row_start, Tensor ell, Tensor tokens, Tensor q_token, Tensor? q, "
      "Tensor? U, Tensor? anchors, Tensor? w1, Tensor? w2, Tensor? temperature, Tensor? greedy, Tensor seeds, "
      "Tensor? row_stats=None, int row_stride=0, Tensor(a!)? block_counter=None, Tensor? thresholds=None, "
      "Tensor? target_argmax=None, Tensor? target_stats=None) "
      "-> (Tensor output_tokens, Tensor num_accepted)");
  m.def("schedule_production(Tensor a_stale, Tensor a_now, Tensor sps_dense, int sps_limit) -> Tensor ell");
  m.def(
      "draft_attention(Tensor q, Tensor k_block, Tensor v_block, Tensor k_pool, Tensor v_pool, Tensor pages, "
      "int page_rows, Tensor lengths, int max_length, Tensor(a!) out) -> ()");
  m.def("draft_attention_smem(int query_rows, int head_dim) -> int", &dspark::draft_attention_smem);
  m.def("softmax_stats(Tensor logits, Tensor(a!) stats, Tensor(b!)? best=None) -> ()");
}

TORCH_LIBRARY_IMPL(dspark, CUDA, m) {
  m.impl("markov_chain", &dspark::markov_chain_cuda);
  m.impl("rejection_sample", &dspark::rejection_sample_cuda);
  m.impl("schedule_production", &dspark::schedule_production_cuda);
  m.impl("draft_attention", &dspark::draft_attention_cuda);
  m.impl("softmax_stats", &dspark::softmax_stats_cuda);
}

TORCH_LIBRARY_IMPL(dspark, Meta, m) {
  m.impl("markov_chain", &dspark::markov_chain_meta);
  m.impl("rejection_sample", &dspark::rejection_sample_meta);
  m.impl("schedule_production", &dspark::schedule_production_meta);
  m.impl("draft_attention", &dspark::draft_attention_meta);
  m.impl("softmax_stats", &dspark::softmax_stats_meta);
}
