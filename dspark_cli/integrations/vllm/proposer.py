"""DSpark proposer for vLLM's Model Runner V1, 0.29.0 to 0.33.0 (built by our patched GPUModelRunner).

It reuses V1's DFlash machinery by inheritance (context-K/V precompute from the captured target
layers, a non-causal block forward over the draft KV cache) with DSpark's anchor-first block:
γ queries = anchor + (γ−1) mask tokens, and every query position is a draft. The sequential part
runs through dspark_cli.runtime: the Markov chain (sampling from the exact Markov-corrected q; by
default without storing it, V1's RejectionSampler then verifying through lazy_drafts, which rebuilds
the one residual row a rejected request needs), the confidence head, and with
`enable_adaptive_verification` the verify-length scheduler. Verify lengths cut the draft lists
handed back to the scheduler, so the next target forward really carries only 1 + ℓ_r tokens."""

import torch
import vllm._dspark
from vllm.forward_context import set_forward_context
from vllm.logger import init_logger
from vllm.v1.spec_decode.dflash import DFlashProposer

from dspark_cli.runtime import check_markov_weight_values, confidence_probs, cuda_ops, markov_chain, rng, survival
from dspark_cli.runtime.sampling import GREEDY_BELOW

from dspark_cli.integrations.vllm.confidence_head import confidence_head_fp32
from dspark_cli.integrations.vllm.draft_probs import PendingDraftProbs
from dspark_cli.integrations.vllm.lazy_drafts import PendingDrafts, lazy_mode
from dspark_cli.integrations.vllm.settings import SchedulerSettings
from dspark_cli.integrations.vllm.step_memory import reserve_pending_q, run_largest_step, warped_by_torch
from dspark_cli.integrations.vllm.verify_length import VerifyLengthScheduler

logger = init_logger(__name__)


TOP_P_FLOOR = torch.finfo(torch.float32).tiny  # the smallest positive top_p (_draft_warps)


# The drafts whose model class this proposer drives (vLLM maps both to Qwen3DSparkForCausalLM);
# DeepSeek V4, Gemma 4 and K3 DSpark drafts run on Model Runner V2.
V1_DRAFT_ARCHITECTURES = ("Qwen3DSparkModel", "Qwen3OmniDSparkModel")


def check_draft_architecture(draft_config) -> None:
    architectures = list(getattr(draft_config, "architectures", None) or [])
    if not set(architectures) & set(V1_DRAFT_ARCHITECTURES):
        raise ValueError(f"the DSpark draft's architecture is {architectures or 'not given'}: Model Runner V1 runs "
                         f"{' and '.join(V1_DRAFT_ARCHITECTURES)} drafts; run other DSpark drafts on Model Runner V2")


def aux_layer_ids(spec_config) -> tuple[int, ...]:
    """Target layers whose outputs the draft reads, as V1 aux-capture points, taken from the config
    key vLLM's V2 runner takes them from (so a checkpoint reads the same layers on both runners, with
    the fc width vLLM's model class built for them): `eagle_aux_hidden_state_layer_ids` (capture
    points already), else `dflash_config.target_layer_ids`, `dspark_target_layer_ids`, the top-level
    `target_layer_ids` (the released format: decoder-layer outputs, which V1 captures as the next
    layer's input, hence +1), else `dflash_config` / `eagle_config` `layer_ids` (capture points)."""
    hf = spec_config.draft_model_config.hf_config
    dflash, eagle = (section if isinstance(section := getattr(hf, name, None), dict) else {}
                     for name in ("dflash_config", "eagle_config"))
    for ids, shift in ((getattr(hf, "eagle_aux_hidden_state_layer_ids", None), 0),
                       (dflash.get("target_layer_ids"), 1),
                       (getattr(hf, "dspark_target_layer_ids", None), 1),
                       (getattr(hf, "target_layer_ids", None), 1),
                       (dflash.get("layer_ids"), 0), (eagle.get("layer_ids"), 0)):
        if ids and isinstance(ids, (list, tuple)):
            return tuple(int(i) + shift for i in ids)
    raise ValueError("the DSpark draft config has no target_layer_ids")


def draft_block_size(draft_config) -> int | None:
    """The block the draft was trained for, looked up as vLLM looks it up (its DSpark config
    checks): `block_size` before `dspark_block_size`, each in dflash_config, then eagle_config,
    then at the top level."""
    for key in ("block_size", "dspark_block_size"):
        for section in ("dflash_config", "eagle_config", None):
            holder = draft_config if section is None else getattr(draft_config, section, None)
            value = holder.get(key) if isinstance(holder, dict) else getattr(holder, key, None)
            if value is not None:
                return value
    return None


def check_draft_vocabulary(draft_config, target_vocab: int) -> None:
    """The drafts' q goes to V1's verifier, which reads it with the target's vocabulary, and the
    Markov bias is added as the released format defines it (logit_scale 1). vLLM's model class
    also loads drafts with a reduced vocabulary (a d2t map), a padded one or another logit_scale:
    refused here at start, not misread later."""
    draft_vocab = getattr(draft_config, "draft_vocab_size", None) or draft_config.vocab_size
    if draft_vocab != target_vocab:
        raise ValueError(f"the DSpark draft's vocabulary has {draft_vocab} entries, the target's {target_vocab}: "
                         f"Model Runner V1 verifies drafts of the target's vocabulary only")
    if draft_config.vocab_size != target_vocab:  # a padded input vocabulary: W1 has as many rows
        raise ValueError(f"the DSpark draft's input vocabulary (vocab_size) has {draft_config.vocab_size} entries, "
                         f"the target's {target_vocab}: Model Runner V1 drafts with the target's vocabulary only")
    scale = getattr(draft_config, "logit_scale", 1.0)
    if scale != 1.0:
        raise ValueError(f"the DSpark draft has logit_scale = {scale}: Model Runner V1 supports drafts without "
                         f"one (logit_scale 1, the released format)")


def check_draft_layout(draft_config) -> None:
    """vLLM lays out a DSpark block by the draft config's `sample_from_anchor` (V2's speculator,
    VllmConfig.num_lookahead_tokens; absent = True): anchor-first, N queries that are all drafts (the
    released format, whose config.json has no such key), or False: the anchor as a bonus query plus
    N masks, only the masks drafting, which vLLM's speculators converter makes the default (it also
    sets dspark_bonus_anchor = not sample_from_anchor). This proposer lays out anchor-first only;
    a bonus-anchor draft would run with near-zero acceptance, so it is refused at start."""
    from_anchor = getattr(draft_config, "sample_from_anchor", True)
    bonus = getattr(draft_config, "dspark_bonus_anchor", False)
    if not from_anchor or bonus:
        raise ValueError(f"the DSpark draft has sample_from_anchor = {from_anchor}, dspark_bonus_anchor = {bonus} "
                         f"(the default of speculators-format checkpoints): its block is the anchor as a bonus "
                         f"query plus num_speculative_tokens masks, and Model Runner V1 drafts only the released "
                         f"anchor-first block (sample_from_anchor true); use Model Runner V2 for this draft")


def warn_unused_draft_topk(draft_config) -> int | None:
    """vLLM puts `dspark_draft_topk` (the speculative_config field, else the draft config's key) on
    the draft config; V2 then drafts each position over the top-k of its base logits. This proposer
    drafts over the full vocabulary: still exact (V1 verifies with the q it sampled from), only not
    what was asked, so a warning, not a refusal. Returns the ignored k."""
    k = getattr(draft_config, "dspark_draft_topk", None)
    if k is not None:
        logger.warning_once("dspark_draft_topk = %d is ignored on Model Runner V1: the DSpark draft samples over "
                            "the full vocabulary (exact, possibly slower than V2's top-k drafting)", k)
    return k


class DSparkProposer(DFlashProposer):
    def __init__(self, vllm_config, device, runner=None):
        draft_config = vllm_config.speculative_config.draft_model_config.hf_config
        check_draft_architecture(draft_config)  # before anything is allocated
        check_draft_layout(draft_config)
        super().__init__(vllm_config, device, runner)
        warn_unused_draft_topk(draft_config)
        spec = vllm_config.speculative_config
        self.gamma = spec.num_speculative_tokens
        block_size = draft_block_size(draft_config)
        if block_size is not None and self.gamma > int(block_size):
            raise ValueError(f"num_speculative_tokens = {self.gamma} exceeds the DSpark draft's block_size = "
                             f"{block_size}: the draft drafts at most block_size tokens per round; "
                             f"set num_speculative_tokens <= {block_size}")
        check_draft_vocabulary(self.draft_model_config.hf_config, vllm_config.model_config.get_vocab_size())
        self.runner = runner
        self.probabilistic = spec.draft_sample_method == "probabilistic"
        self.adaptive = bool(spec.enable_adaptive_verification)
        self.verify_lengths = None
        # Sampled drafts reach V1's verifier without a q tensor (lazy_drafts) where the series has
        # its hook, unless DSPARK_V1_DRAFT_Q=stored or another acceptance rule (synthetic, FLy).
        standard = getattr(spec, "rejection_sample_method", "standard") == "standard"
        self.lazy_q = (self.probabilistic and standard
                       and lazy_mode(getattr(vllm._dspark, "V1_LAZY_VERIFY", False)))
        # Each request's pending block (or its q) until verified: a request the scheduler skips
        # keeps drafts of an older step; V1's runner alone would verify its whole batch one-hot then.
        self.pending_q = PendingDrafts() if self.lazy_q else PendingDraftProbs()
        if runner is not None and self.probabilistic:
            self.pending_q.install(runner)
        if self.adaptive:
            settings = SchedulerSettings.resolve(self.draft_model_config.hf_config, self.gamma)
            self.verify_lengths = VerifyLengthScheduler(settings)
        # Per-step statistics for `dspark verify vllm` and tests: drafted vs scheduled tokens, and
        # the pending drafts' counters (blocks held for skipped requests, draft rows verified from
        # them, placeholder rows), the same dict pending_q updates.
        self.stats = {"steps": 0, "requests": 0, "drafted": 0, "scheduled": 0, "q": self.pending_q.counts}
        # Drafting's memory in vLLM's profiling run (step_memory): the pending q's size reserved from
        # load_model to the first real draft; the largest step's tensors made at the first dummy run
        # that captures no graph (the profiling run).
        self._pending_q_reserve = None
        self.stats["profiled_step"] = None

    def load_model(self, target_model) -> None:
        super().load_model(target_model)
        head = self.model.model.markov_head
        check_markov_weight_values(head.markov_w1.weight, head.markov_w2.weight)
        self.confidence_head = None
        if self.adaptive:
            self.confidence_head = confidence_head_fp32(self.model.model.confidence_head)
        if self.probabilistic:
            self._pending_q_reserve = reserve_pending_q(self.vllm_config.scheduler_config.max_num_seqs, self.gamma,
                                                        self.vllm_config.model_config.get_vocab_size(), self.device,
                                                        self.dtype if self.lazy_q else torch.float32)

    def dummy_run(self, num_tokens, *args, **kwargs) -> None:
        super().dummy_run(num_tokens, *args, **kwargs)
        if self.stats["profiled_step"] is None and not kwargs.get("is_graph_capturing", False):
            self._run_largest_step()

    def _run_largest_step(self) -> None:
        requests = self.vllm_config.scheduler_config.max_num_seqs
        head = self.model.model.markov_head
        run_largest_step(self.model.compute_draft_logits, head.markov_w1.weight, head.markov_w2.weight,
                         requests=requests, gamma=self.gamma, hidden_size=self.hidden_size, dtype=self.dtype,
                         device=self.device, sample=self.probabilistic, store_q=not self.lazy_q,
                         confidence_head=self.confidence_head)
        kv_caches = getattr(self.runner, "kv_caches", None)
        self.stats["profiled_step"] = {"requests": requests, "sampled": self.probabilistic,
                                       "before_kv_cache": None if kv_caches is None else not kv_caches,
                                       "pending_q_reserved": self._pending_q_reserve is not None}

    @torch.inference_mode()
    def propose(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                mm_embed_inputs=None, num_rejected_tokens_gpu=None, slot_mappings=None):
        self._last_draft_probs = None
        self._pending_q_reserve = None  # real pending q from here on
        R, gamma = common_attn_metadata.batch_size(), self.gamma
        h = self._block_hidden_states(target_token_ids, target_positions, target_hidden_states,
                                      next_token_ids, common_attn_metadata, num_rejected_tokens_gpu)
        h = h[: R * gamma].view(R, gamma, -1)
        U = self.model.compute_draft_logits(h.reshape(R * gamma, -1)).view(R, gamma, -1)
        V = U.shape[-1]
        head = self.model.model.markov_head
        temperature, top_k, top_p, top_k_max = self._draft_warps(sampling_metadata, R, V)
        # host-side (sampling_metadata.all_greedy): reading the temperatures would sync every step
        need_q = self._samples(sampling_metadata) and (not self.lazy_q or warped_by_torch(U, top_k, top_p))
        confidence = None if self.confidence_head is None else (h, *self.confidence_head)
        # copies: a lazy block keeps its anchors and warps until verified, the runner's buffers change
        draft = markov_chain(U, next_token_ids[:R].to(torch.int64, copy=True), head.markov_w1.weight,
                             head.markov_w2.weight[:V], temperature, top_k=top_k, top_p=top_p, top_k_max=top_k_max,
                             seeds=self._draft_seeds(sampling_metadata, U, R), return_q=need_q,
                             confidence=confidence)
        # The block always drafts γ; vLLM's scheduler may ask for fewer this step
        # (num_speculative_tokens_per_batch_size): hand it at most that many.
        k = min(int(num_speculative_tokens), gamma)
        tokens = draft.tokens[:, :k]
        if need_q and not self.lazy_q:
            self._last_draft_probs = draft.q.contiguous()
        discard = self._discarded_rows(R)
        if self.runner is not None and self.probabilistic:  # pending_q is installed only then
            req_ids = list(self.runner.input_batch.req_ids[:R])
            dropped = () if discard is None else [req_ids[i] for i in discard.nonzero()[0]]
            self.pending_q.drafted(req_ids, draft if self.lazy_q else self._last_draft_probs, self.runner.requests,
                                   dropped)
        self.stats["steps"] += 1
        self.stats["requests"] += R
        self.stats["drafted"] += R * gamma
        if not self.adaptive:
            self.stats["scheduled"] += R * k
            return tokens
        room = self._draft_room(common_attn_metadata, num_rejected_tokens_gpu, R)
        ell = self._verify_lengths(self._survival(draft.confidence_logits), k, R, sampling_metadata, discard, room)
        self.stats["scheduled"] += sum(ell)
        rows = tokens.tolist()
        return [row[:n] for row, n in zip(rows, ell)]

    def _survival(self, confidence_logits: torch.Tensor) -> torch.Tensor:
        """Survival a [R, γ] from the head's logits z = w·[h_k ; W1[x_{k-1}]] + b, which came with the
        draft (our CUDA chain computes them in its last launch), through the STS calibration if set."""
        return survival(confidence_probs(confidence_logits, self.verify_lengths.settings.sts))

    def _discarded_rows(self, R: int):
        """Host mask [R] of the batch rows whose drafts vLLM discards (prefill chunks), or None."""
        mask = None if self.runner is None else getattr(self.runner, "discard_request_mask", None)
        return None if mask is None else mask.np[:R]

    def _draft_room(self, cad, num_rejected_tokens_gpu, R: int) -> torch.Tensor:
        """[R] int64 on the device: how many drafts of each request the next step can still use. A
        request ends at L = min(prompt + max_tokens, max_model_len) tokens (V1's check_stop); after
        this step it has seq_len − rejected + 1 (this step's sampled token sits at seq_len −
        rejected), and the next step yields at most ℓ + 1, so drafts past L − that − 1 would be
        verified for tokens vLLM drops. From host limits and the step's device lengths: no sync."""
        max_len = self.vllm_config.model_config.max_model_len
        limits = []
        for req_id in self.runner.input_batch.req_ids[:R]:
            state = self.runner.requests[req_id]
            max_tokens = getattr(state.sampling_params, "max_tokens", None)
            limits.append(max_len if max_tokens is None else min(max_len, state.num_prompt_tokens + max_tokens))
        after = cad.seq_lens[:R].to(torch.int64) + 1
        if num_rejected_tokens_gpu is not None:
            after = after - num_rejected_tokens_gpu[:R].to(torch.int64)
        limit = torch.tensor(limits, dtype=torch.int64).to(after.device, non_blocking=True)
        return (limit - after - 1).clamp_min(0)

    def _verify_lengths(self, a: torch.Tensor, k: int, R: int, sampling_metadata, discard,
                        room: torch.Tensor | None = None) -> list[int]:
        """ℓ_r ∈ [0, k] from survival a [R, γ]. Only what can be verified is scheduled: the first k
        positions (the scheduler hands over k), and not the rows of prefill chunks, whose drafts
        vLLM discards (they would count in the batch B). A seeded request verifies all k: V1 draws
        one uniform per verified draft from the request's generator, so a batch-dependent ℓ would
        make its output depend on the batch; its survival counts as 1 in the schedule (its tokens are
        in the batch). discard: _discarded_rows(R). room: _draft_room (None: no cap); an unseeded
        request's drafts past it (tokens past max_tokens / max_model_len) count as survival 0 and
        are not verified: the cap depends on token counts only, never on the current drafts."""
        ell = [0] * R
        if k <= 0:
            return ell
        if room is not None:
            a = a * (torch.arange(a.shape[1], device=a.device) < room.unsqueeze(1))
        seeded = [i for i in sampling_metadata.generators if i < R]
        if seeded:
            a = a.clone()
            a[torch.tensor(seeded, dtype=torch.int64, device=a.device)] = 1.0
        if room is not None and seeded:
            room = room.clone()
            room[torch.tensor(seeded, dtype=torch.int64, device=room.device)] = k
        req_ids = self.runner.input_batch.req_ids

        def lengths(rows: list[int], survival: torch.Tensor) -> list[int]:
            n = self.verify_lengths.lengths([req_ids[i] for i in rows], survival, k)
            # production's top-K may admit candidates of survival 0 past the room: cut them
            return (n if room is None else torch.minimum(n, room[rows].to(n.device))).tolist()

        if discard is None or not discard.any():
            ell = lengths(list(range(R)), a)
        else:
            rows = [i for i in range(R) if not discard[i]]
            if rows:
                index = torch.tensor(rows, dtype=torch.int64, device=a.device)
                for i, n in zip(rows, lengths(rows, a[index])):
                    ell[i] = n
        for i in seeded:
            if discard is None or not discard[i]:
                ell[i] = k
        return ell

    def _block_hidden_states(self, target_token_ids, target_positions, target_hidden_states,
                             next_token_ids, cad, num_rejected_tokens_gpu) -> torch.Tensor:
        """One non-causal forward over [anchor, mask×(γ−1)] per request, attending to the draft KV
        of all committed tokens (projected here from the captured target layers)."""
        context = self.model.combine_hidden_states(target_hidden_states)
        # DFlash's input builder lays out 1 + num_speculative_tokens queries: ask it for γ−1 masks.
        self.num_speculative_tokens = self.gamma - 1
        try:
            num_tokens, _, cad = self.set_inputs_first_pass(
                target_token_ids=target_token_ids, next_token_ids=next_token_ids,
                target_positions=target_positions, target_hidden_states=context,
                token_indices_to_sample=None, cad=cad, num_rejected_tokens_gpu=num_rejected_tokens_gpu)
        finally:
            self.num_speculative_tokens = self.gamma
        _, per_layer = self.build_per_group_and_layer_attn_metadata(cad)
        mode, num_input_tokens, across_dp = self._determine_batch_execution_and_padding(num_tokens)
        kwargs, slot_size = self.build_model_inputs_first_pass(num_tokens, num_input_tokens, None)
        with set_forward_context(per_layer, self.vllm_config, num_tokens=num_input_tokens,
                                 num_tokens_across_dp=across_dp, cudagraph_runtime_mode=mode,
                                 slot_mapping=self._get_slot_mapping(slot_size, cad.slot_mapping)):
            return self.model(**kwargs)

    def _draft_seeds(self, sampling_metadata, U: torch.Tensor, R: int) -> torch.Tensor | None:
        """A fresh counter-based key per request and round (what our CUDA chain draws with).
        Unseeded requests take theirs from torch's generator, as vLLM's own sampling does (the same
        on every rank); a seeded request's is its seed keyed on the position of its block's anchor
        (rng.round_seeds), so its output does not depend on what else is in the batch. None when
        neither our CUDA chain nor a seeded request needs keys: the torch reference then draws
        from torch's generator, cheaper there than counter-based noise (7.5 against 1.1 ms per
        draft at the CPU tests' sizes)."""
        rows = [i for i in sampling_metadata.generators if i < R]
        if not rows and not cuda_ops.available(U):
            return None
        seeds = torch.randint(0, 2**63 - 1, (R,), dtype=torch.int64, device=self.device)
        if rows:
            positions = self._get_positions(R * self.gamma)
            positions = positions[0] if positions.dim() == 2 else positions  # M-RoPE: text rows agree
            index = torch.tensor(rows, dtype=torch.int64, device=self.device)
            request_seeds = rng.seed_tensor([sampling_metadata.generators[i].initial_seed() for i in rows],
                                            self.device)
            seeds[index] = rng.round_seeds(request_seeds, positions[index * self.gamma])
        return seeds

    def _samples(self, sampling_metadata) -> bool:
        """Whether this step drafts by sampling (some request at temperature > 0), from host state."""
        return self.probabilistic and not sampling_metadata.all_greedy and sampling_metadata.temperature is not None

    def _draft_warps(self, sampling_metadata, R: int, V: int):
        """Draft with the request's temperature/top-k/top-p (any q is lossless; matching the
        target's warp maximizes acceptance). Greedy drafting when draft_sample_method=greedy, and
        for requests with structured outputs: vLLM's scheduler cuts their drafts at the first token
        the grammar rejects, which is exact for a one-hot q (that draft would be rejected surely,
        with residual p) but biased for a sampled one (the cut depends on the sampled token, and the
        user then gets a fresh sample from p instead of the residual norm(max(p − q, 0))).
        Also the sampled rows' largest top-k from the batch's host copies, for the CUDA chain."""
        device = self.device
        if not self._samples(sampling_metadata):
            return torch.zeros(R, dtype=torch.float32, device=device), None, None, None
        temperature = sampling_metadata.temperature[:R].to(torch.float32, copy=True)
        structured = self._structured_output_rows(R)
        if structured:
            temperature[torch.tensor(structured, dtype=torch.int64, device=device)] = 0.0
        top_k = sampling_metadata.top_k
        top_p = sampling_metadata.top_p
        top_k = None if top_k is None else top_k[:R].to(torch.int64, copy=True)
        # vLLM takes any top_p in (0, 1]; its float32 batch holds one below ~1e-45 as 0, which keeps the
        # top token alone there and which the draft's warp refuses: the smallest positive top_p keeps
        # the same token
        top_p = None if top_p is None else top_p[:R].to(torch.float32, copy=True).clamp_min_(TOP_P_FLOOR)
        return temperature, top_k, top_p, None if top_k is None else self._top_k_bound(R, structured)

    def _top_k_bound(self, R: int, structured: list[int]) -> int | None:
        """The largest top-k of the rows that sample, read from V1's InputBatch host arrays (a row
        without top-k holds the vocabulary size there), without a device sync; None when the
        runner has no such arrays. It only lets the CUDA chain skip work: the draft is the same."""
        batch = getattr(self.runner, "input_batch", None)
        top_k, temperature = getattr(batch, "top_k_cpu", None), getattr(batch, "temperature_cpu", None)
        if top_k is None or temperature is None:
            return None
        sampled = temperature[:R] >= GREEDY_BELOW
        sampled[structured] = False
        return int(top_k[:R][sampled].max()) if sampled.any() else None

    def _structured_output_rows(self, R: int) -> list[int]:
        """Rows of the batch whose requests have structured outputs (a grammar the scheduler
        validates drafts against)."""
        runner = self.runner
        if runner is None:
            return []
        requests = runner.requests
        rows = []
        for i, req_id in enumerate(runner.input_batch.req_ids[:R]):
            state = requests.get(req_id)
            params = None if state is None else state.sampling_params
            if params is not None and params.structured_outputs is not None:
                rows.append(i)
        return rows
