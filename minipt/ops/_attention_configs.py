"""Launch configs of the Triton attention kernels: a data table, kept apart from the op's code."""

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per compute capability, kernel, head
# dim class (up to 64, or 128) and bytes per element. The tiles follow the Triton
# tutorial's and FlashAttention-2's: 128-row query blocks on tensor cores for the
# forward and the dQ pass; the dK/dV pass holds a wide key block and walks thin
# query blocks (the mirror image). Where the tutorial's 4 warps run out of
# registers, 8 warps share the same tile. fp32 inputs run exact fp32 dots
# (input_precision="ieee"), which live in registers, hence the small tiles.
#
# Checked by tests/test_compile_gate.py, which compiles the kernels without a GPU
# (fp16/bf16 exhaustively: head dims 16-128, causal or not, key mask or not; fp32
# and short sequences sampled, fp32 compiled exhaustively once for sm_80 and
# sm_90 when the table was chosen) and passes with Triton 3.6 and 3.9: no spilled
# register on sm_80 and sm_90, shared memory within 163 KB (sm_80) and 227 KB
# (sm_90) per block, tensor-core instructions for fp16/bf16; the 16-bit variants
# of the 8.6 and 8.9 entries (head dims 64 and 128) also compile spill-free within
# their 99 KB. A capability between entries takes the nearest lower one. A fixed
# table rather than an autotuner: each config is one compile, where tuning would
# compile and time every candidate for every shape class.
_FP32_CONFIGS = {
    ("fwd", 64, 4): (32, 32, 8, 2),
    ("fwd", 128, 4): (32, 16, 8, 2),
    ("dkdv", 64, 4): (32, 32, 8, 2),
    ("dkdv", 128, 4): (16, 32, 8, 2),
    ("dq", 64, 4): (32, 32, 8, 2),
    ("dq", 128, 4): (32, 16, 8, 2),
}
_AMPERE_CONFIGS = {
    ("fwd", 64, 2): (128, 32, 8, 3),
    ("fwd", 128, 2): (128, 32, 8, 3),
    ("dkdv", 64, 2): (16, 128, 8, 3),
    ("dkdv", 128, 2): (32, 64, 8, 3),
    ("dq", 64, 2): (128, 32, 8, 3),
    ("dq", 128, 2): (128, 32, 8, 3),
    **_FP32_CONFIGS,
    # With 8 warps ptxas holds some fp32 kernels to 80 registers and spills on
    # sm_8x; 4 warps do not spill there (but spill 256-448 B on sm_90).
    ("fwd", 64, 4): (32, 32, 4, 2),
    ("dkdv", 64, 4): (16, 32, 4, 2),
    ("dkdv", 128, 4): (16, 32, 4, 2),
}
# 8.6 and 8.9 have about 100 KB per SM: two stages bring the D = 128 forward from
# 64 to 48 KB, two blocks per SM. Elsewhere two stages gained no second block, and
# once made ptxas spill (the D = 64 forward, Triton 3.9).
_SMALL_SHARED_CONFIGS = {**_AMPERE_CONFIGS, ("fwd", 128, 2): (128, 32, 8, 2)}
_CONFIGS = {
    (8, 0): _AMPERE_CONFIGS,
    (8, 6): _SMALL_SHARED_CONFIGS,
    (8, 9): _SMALL_SHARED_CONFIGS,
    (9, 0): {
        ("fwd", 64, 2): (128, 64, 8, 3),
        ("fwd", 128, 2): (128, 64, 8, 3),
        ("dkdv", 64, 2): (64, 128, 8, 3),
        ("dkdv", 128, 2): (32, 128, 8, 3),
        ("dq", 64, 2): (128, 32, 4, 4),
        ("dq", 128, 2): (128, 32, 8, 3),
        **_FP32_CONFIGS,
        ("dq", 64, 4): (32, 32, 4, 2),  # 8 warps: 80 registers and a spill (Triton 3.6)
    },
}
# Packed documents keep each query row's document start live through the dQ loop:
# on sm_80 the D = 128 dQ kernel then needed more than 255 registers and spilled
# 16-48 B (Triton 3.9); 64-row query blocks on 4 warps use 230-248 and spill none.
# Capabilities below 9.0 take these entries when document_ids are given.
_AMPERE_DOCUMENT_CONFIGS = {("dq", 128, 2): (64, 32, 4, 3)}
# Sequences of at most 64 tokens fill a 128-row query block only half: 64 rows.
_SHORT_T = 64
_SHORT_CONFIGS = {"fwd": (64, 64, 4, 3), "dq": (64, 32, 4, 3)}
# The interpreter runs small unequal blocks, so that test sizes cross diagonal and tail blocks.
_INTERPRETER_CONFIGS = {"fwd": (32, 16, 1, 1), "dkdv": (16, 32, 1, 1), "dq": (32, 16, 1, 1)}


def _table_capability(capability: tuple[int, int]) -> tuple[int, int]:
    """The table's entry for ``capability``: itself, else the nearest lower one (the lowest below 8.0)."""
    lower = [c for c in _CONFIGS if c <= capability]
    return max(lower) if lower else min(_CONFIGS)
