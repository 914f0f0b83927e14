"""Engine-agnostic DSpark math in PyTorch (the contract: docs/runtime-api.md). Each public function
validates its inputs, dispatches to dspark_cli.runtime.cuda_ops when that extension is loaded and
the inputs are on CUDA, and otherwise runs the torch reference defined here."""

from dspark_cli.runtime.confidence import STSCalibration, confidence_logits, confidence_probs, survival
from dspark_cli.runtime.markov import (MarkovDraft, check_markov_weight_values, gather_drafts, markov_chain,
                                       residual_row)
from dspark_cli.runtime.rejection import VerifyResult, rejection_sample, rejection_sample_flat, rejection_sample_rows
from dspark_cli.runtime.sampling import probs_from_logits, warp_logits
from dspark_cli.runtime.scheduler import (
    admit_top_k,
    schedule_exact,
    schedule_production,
    schedule_threshold,
    verify_budget,
)
from dspark_cli.runtime.sps import SPSTable
from dspark_cli.runtime.target_probs import LogitRows, logit_rows, softmax_rows

__all__ = [
    "MarkovDraft", "markov_chain", "residual_row", "gather_drafts", "check_markov_weight_values",
    "confidence_logits", "confidence_probs", "survival", "STSCalibration",
    "schedule_threshold", "schedule_exact", "schedule_production", "verify_budget", "admit_top_k",
    "rejection_sample", "rejection_sample_flat", "rejection_sample_rows", "VerifyResult",
    "SPSTable", "warp_logits", "probs_from_logits", "softmax_rows", "LogitRows", "logit_rows",
]
