"""The mask-adapter file format, as a pure codec: packed pattern indices, deltas, base-model fingerprints.

Reading adapters from disk or the Hub is :mod:`sparse_peft.adapter_io`; this module only turns tensors into
tensors.

A mask adapter is a PEFT adapter folder: ``adapter_config.json`` (a :class:`~sparse_peft.MaskConfig`) and
``adapter_model.safetensors`` holding, for every masked layer ``<name>`` (a module name of the base model, prefixed
``base_model.model.`` as PEFT does):

* ``<name>.maskllm_pattern_codes`` — uint8 ``[ceil(G / k)]``: the chosen pattern index of each of the ``G``
  groups (row-major order of the ``[out, in]`` weight) as base-``C`` digits, ``k`` per byte, first group in the
  lowest digit: byte ``j`` is ``sum_i index[j*k + i] * C**i`` with ``k`` the largest number with ``C**k <= 256``
  (``C = C(m, n)``; for 2:4, ``C = 6``, ``k = 3``: 8/3 bits per group = 0.667 bit per weight; the information is
  log2(6)/4 = 0.646). Written for the N:M whose digits beat bit packing (``C`` = 3 or 6); for the others:
* ``<name>.maskllm_pattern_bits`` — uint8 ``[ceil(G * b / 8)]``: the pattern indices at
  ``b = ceil(log2(C(m, n)))`` bits each, least significant bit first. (Also what adapters saved before the
  digit coding hold for 2:4: 3 bits per group, 0.75 bit per weight; both are read.)
* ``<name>.maskllm_shape`` — int64 ``[2]``: ``[out, in]`` of the weight the mask belongs to.
* ``<name>.maskllm_fingerprint`` — float32 ``[FINGERPRINT_SIZE]``: base-weight values at fixed positions, so
  loading onto a different base model fails with a clear error instead of silently producing a bad model.
* ``<name>.maskllm_logits`` — float32 ``[G, C]``: only with ``save_logits=True``, to continue training.

Delta-coded adapters
--------------------
A task adapter learned from a general mask (``MaskConfig(prior=<mask adapter>)``, ``save_delta``) stores, instead of
the full ``maskllm_pattern_codes`` / ``maskllm_pattern_bits``, only the ``K`` groups whose pattern differs from the
general mask's:

* ``<name>.maskllm_delta_info`` — int64 ``[3]``: ``[K, coding, gap_bits]``.
* ``<name>.maskllm_delta_positions`` — uint8: which groups changed, in one of three codings (``coding``); the
  writer picks the one whose positions and patterns take the fewest bytes:

  * ``0`` (gaps): the sorted changed-group indices ``p_0 < ... < p_{K-1}`` as gaps ``p_0, p_1 - p_0 - 1, ...``,
    each packed at ``gap_bits = max(1, bit_length(largest gap))`` bits like the pattern indices;
    ``ceil(K * gap_bits / 8)`` bytes;
  * ``1`` (bitmap): one bit per group (1 = changed), packed like the pattern indices; ``ceil(G / 8)`` bytes,
    ``gap_bits`` is 0;
  * ``2`` (Rice): the same gaps, Rice-coded with parameter ``k = gap_bits`` (0-62) in two parts: first the
    quotients ``gap >> k`` in unary (that many 1 bits, then a 0), one bit stream packed like the pattern indices;
    then the remainders ``gap & (2^k - 1)`` packed at ``k`` bits each (``ceil(K * k / 8)`` bytes, none for
    ``k = 0``). Close to the entropy of the positions when changes are spread evenly (e.g. 3.9 bits per change at
    17% of the groups changed, against 6-8 for ``0`` and 5.8 for ``1``).

* ``<name>.maskllm_delta_patterns`` — uint8: the new pattern of each changed group, in position order. Codings
  ``0`` and ``1``: its index, ``b = ceil(log2(C(m, n)))`` bits each, packed as in ``maskllm_pattern_bits``
  (``ceil(K * b / 8)`` bytes). Coding ``2``: its rank among the ``C - 1`` patterns other than the general mask's
  (``new - (new > general)``), as base-``(C - 1)`` digits like ``maskllm_pattern_codes`` where those are smaller
  than bits (for 2:4, ``5**3 <= 256``: 2.67 bits per change), else bits; nothing when ``C = 2``.

``shape`` and ``fingerprint`` are stored as for full adapters (the base check does not need the general mask).
``adapter_config.json`` names the general mask: ``prior`` (its local path or Hub id) and ``prior_sha256`` (sha256
of its ``adapter_model.safetensors``). Reading a delta adapter loads that general mask, refuses it if its hash
differs, and applies the changes. A general mask may itself be delta-coded against another one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .constants import LOGITS, PEFT_KEY_PREFIX, PREFIX
from .patterns import candidate_patterns, hard_mask_from_indices, index_bits, num_candidates

FINGERPRINT_SIZE = 8
#: Checkpoint key suffixes, after the module name (:data:`~sparse_peft.constants.LOGITS` is the layer's own name).
PATTERN_BITS = f"{PREFIX}pattern_bits"
PATTERN_CODES = f"{PREFIX}pattern_codes"
SHAPE = f"{PREFIX}shape"
FINGERPRINT = f"{PREFIX}fingerprint"
DELTA_INFO = f"{PREFIX}delta_info"
DELTA_POSITIONS = f"{PREFIX}delta_positions"
DELTA_PATTERNS = f"{PREFIX}delta_patterns"
DELTA_FIELDS = (DELTA_INFO, DELTA_POSITIONS, DELTA_PATTERNS)
RECORD_FIELDS = (PATTERN_BITS, PATTERN_CODES, SHAPE, FINGERPRINT, LOGITS, *DELTA_FIELDS)
#: ``coding`` values of ``maskllm_delta_info``: how the changed-group positions are stored.
DELTA_GAPS, DELTA_BITMAP, DELTA_RICE = 0, 1, 2
# Relative tolerance of the fingerprint check: a bf16 copy of the same base differs by < 0.4%.
_FINGERPRINT_RTOL = 1e-2
_FINGERPRINT_ATOL = 1e-5


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[G]`` integer indices ``< 2**bits`` into uint8 ``[ceil(G * bits / 8)]``, LSB first."""
    shifts = torch.arange(bits, device=indices.device)
    stream = ((indices.long().unsqueeze(1) >> shifts) & 1).flatten().to(torch.uint8)  # [G * bits]
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    weights = (1 << torch.arange(8, device=indices.device)).to(torch.uint8)
    return (stream.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_indices(packed: torch.Tensor, num_groups: int, bits: int) -> torch.Tensor:
    """Invert :func:`pack_indices`: uint8 ``[ceil(G * bits / 8)]`` -> int64 ``[G]``."""
    expected = (num_groups * bits + 7) // 8
    if packed.dtype != torch.uint8 or packed.shape != (expected,):
        raise ValueError(
            f"packed mask has dtype {packed.dtype} and shape {tuple(packed.shape)}; expected uint8 [{expected}] for "
            f"{num_groups} groups of {bits} bits. The adapter file is corrupt or was written for another layer."
        )
    stream = (packed.long().unsqueeze(1) >> torch.arange(8, device=packed.device)) & 1  # [bytes, 8]
    stream = stream.flatten()[: num_groups * bits].view(num_groups, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(dim=1)


def digits_per_byte(candidates: int) -> int:
    """How many base-``candidates`` digits one byte holds: the largest ``k`` with ``C**k <= 256``."""
    k = 1
    while candidates ** (k + 1) <= 256:
        k += 1
    return k


def _bits(values: int) -> int:
    """Bits of one packed index below ``values`` (at least 1): ``index_bits`` for ``values = C``."""
    return max(1, (values - 1).bit_length())


def _digits_beat_bits(values: int) -> bool:
    """Whether indices below ``values`` pack smaller as base-``values`` digits than as :func:`_bits`-wide indices."""
    return 8 / digits_per_byte(values) < _bits(values)


def uses_pattern_codes(n: int, m: int) -> bool:
    """Whether full masks of this N:M are stored as base-C digits (fewer bytes than :func:`pack_indices`)."""
    return _digits_beat_bits(num_candidates(n, m))


def pack_codes(indices: torch.Tensor, candidates: int) -> torch.Tensor:
    """Pack ``[G]`` indices ``< C`` into uint8 ``[ceil(G / k)]``, ``k`` base-C digits per byte, lowest digit first."""
    k = digits_per_byte(candidates)
    digits = torch.nn.functional.pad(indices.long().flatten(), (0, (-indices.numel()) % k)).view(-1, k)
    powers = candidates ** torch.arange(k, device=indices.device)
    return (digits * powers).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, num_groups: int, candidates: int) -> torch.Tensor:
    """Invert :func:`pack_codes`: uint8 ``[ceil(G / k)]`` -> int64 ``[G]``; ValueError if it cannot be such codes."""
    k = digits_per_byte(candidates)
    expected = -(-num_groups // k)
    if packed.dtype != torch.uint8 or packed.shape != (expected,):
        raise ValueError(
            f"packed mask has dtype {packed.dtype} and shape {tuple(packed.shape)}; expected uint8 [{expected}] for "
            f"{num_groups} groups, {k} per byte. The adapter file is corrupt or was written for another layer."
        )
    codes = packed.long()
    if codes.numel() and int(codes.max()) >= candidates**k:
        raise ValueError(f"packed mask holds a byte >= {candidates}**{k}: the adapter file is corrupt.")
    powers = candidates ** torch.arange(k, device=packed.device)
    return ((codes.unsqueeze(1) // powers) % candidates).flatten()[:num_groups]


def pattern_bytes(field: str, shape: tuple[int, int], n: int, m: int) -> int:
    """Length of a full mask's :data:`PATTERN_CODES` or :data:`PATTERN_BITS` tensor for ``n:m`` masks of a
    ``[out, in]`` weight (``in`` divisible by ``m``)."""
    num_groups = shape[0] * shape[1] // m
    if field == PATTERN_CODES:
        return -(-num_groups // digits_per_byte(num_candidates(n, m)))
    return (num_groups * index_bits(n, m) + 7) // 8


def n_m_of_pattern_field(field: str, length: int, shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Every N:M (``0 < n < m <= 8``) whose full masks of a ``[out, in]`` weight take ``length`` bytes in ``field``.

    Only N:M the writer stores in that field count: :data:`PATTERN_CODES` is written for the N:M of
    :func:`uses_pattern_codes`, :data:`PATTERN_BITS` is read for any.
    """
    return [
        (n, m)
        for m in range(2, 9)
        for n in range(1, m)
        if shape[1] % m == 0
        and (field == PATTERN_BITS or uses_pattern_codes(n, m))
        and pattern_bytes(field, shape, n, m) == length
    ]


def check_pattern_size(name: str, field: str, length: int, shape: tuple[int, int], n: int, m: int) -> None:
    """Raise ``ValueError`` unless one layer's stored pattern field of ``length`` bytes holds ``n:m`` masks of
    ``shape`` ``[out, in]``.

    If the bytes fit another N:M, the message says that the config (``adapter_config.json``, where ``n`` and ``m``
    are recorded) and the weights file disagree, with both values; otherwise that the file is corrupt.
    """
    if pattern_bytes(field, shape, n, m) == length:
        return
    fits = n_m_of_pattern_field(field, length, shape)
    if fits:
        found = " or ".join(f"{a}:{b}" for a, b in fits)
        raise ValueError(
            f"adapter_config.json says the masks are {n}:{m}, but the weights file holds {found} masks (entry "
            f"{name!r}: {length} bytes of {field} for weight shape {shape}): the config and the weights file "
            f"disagree. Restore the adapter_config.json saved with this adapter_model.safetensors, or set \"n\" "
            f"and \"m\" in it to the file's {fits[0][0]} and {fits[0][1]}."
        )
    raise ValueError(
        f"Mask adapter entry for {name!r} has {length} bytes of {field}; {n}:{m} masks of weight shape {shape} take "
        f"{pattern_bytes(field, shape, n, m)}. The adapter file is corrupt."
    )


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """``FINGERPRINT_SIZE`` float32 values of a ``[out, in]`` weight at evenly spaced flat positions (CPU)."""
    flat = weight.detach().reshape(-1)
    positions = torch.linspace(0, flat.numel() - 1, FINGERPRINT_SIZE, device=flat.device).long()
    return flat[positions].float().cpu()


def fingerprints_match(saved: torch.Tensor, current: torch.Tensor) -> bool:
    """Whether two fingerprints come from the same base weights (tolerates fp32 vs bf16/fp16 copies), compared on
    the CPU: PEFT may load an adapter's tensors onto another device than the model's."""
    return saved.shape == current.shape and torch.allclose(
        current.float().cpu(), saved.float().cpu(), rtol=_FINGERPRINT_RTOL, atol=_FINGERPRINT_ATOL
    )


@dataclass
class MaskRecord:
    """One layer's entry in a mask adapter: the hard mask as pattern indices, and what it was made for."""

    shape: tuple[int, int]  # [out, in] of the weight
    indices: torch.Tensor  # int64 [G], pattern index per group
    fingerprint: torch.Tensor  # float32 [FINGERPRINT_SIZE]
    logits: torch.Tensor | None = None  # float32 [G, C], only if saved

    def mask(self, n: int, m: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """The hard mask ``[out, in]``, exactly n:m."""
        groups = hard_mask_from_indices(self.indices, candidate_patterns(n, m, dtype=dtype))
        return groups.view(self.shape)


def _pack_alternatives(ranks: torch.Tensor, candidates: int) -> torch.Tensor:
    """Pack ``[K]`` ranks ``< C - 1`` (a changed group's new pattern among the other ``C - 1``): base-``(C - 1)``
    digits where they beat bits, else bits; empty for ``C = 2`` (the other pattern is the only one)."""
    others = candidates - 1
    if others == 1:
        return torch.zeros(0, dtype=torch.uint8)
    if _digits_beat_bits(others):
        return pack_codes(ranks, others)
    return pack_indices(ranks, _bits(others))


def _unpack_alternatives(packed: torch.Tensor, count: int, candidates: int) -> torch.Tensor:
    """Invert :func:`_pack_alternatives`: -> int64 ``[count]`` ranks; ValueError if the tensor does not fit."""
    others = candidates - 1
    if others == 1:
        if packed.numel():
            raise ValueError(f"delta patterns hold {packed.numel()} bytes where none belong")
        return torch.zeros(count, dtype=torch.long)
    if _digits_beat_bits(others):
        return unpack_codes(packed, count, others)
    ranks = unpack_indices(packed, count, _bits(others))
    if ranks.numel() and int(ranks.max()) >= others:
        raise ValueError(f"delta patterns hold a rank >= {others}")
    return ranks


def _rice_parameter(gaps: torch.Tensor) -> int:
    """The Rice parameter ``k`` that codes ``gaps`` (int64 ``[K]``, K > 0) in the fewest bits."""
    top = max(1, int(gaps.max()).bit_length())
    sizes = [int((gaps >> k).sum()) + len(gaps) * (1 + k) for k in range(top + 1)]
    return min(range(top + 1), key=sizes.__getitem__)


def _rice_positions(gaps: torch.Tensor, k: int) -> torch.Tensor:
    """Coding ``2``'s positions field: the unary quotients' bit stream, then the ``k``-bit remainders."""
    quotients = gaps >> k
    stream = torch.ones(int(quotients.sum()) + len(gaps), dtype=torch.long)
    stream[torch.cumsum(quotients + 1, 0) - 1] = 0  # each quotient's terminating 0
    remainders = pack_indices(gaps & ((1 << k) - 1), k) if k else torch.zeros(0, dtype=torch.uint8)
    return torch.cat([pack_indices(stream, 1), remainders])


def _rice_gaps(positions: torch.Tensor, count: int, k: int) -> torch.Tensor:
    """Invert :func:`_rice_positions`: -> int64 ``[count]`` gaps; ValueError if the field does not fit."""
    if positions.dtype != torch.uint8 or positions.dim() != 1:
        raise ValueError(f"delta positions have dtype {positions.dtype} and {positions.dim()} dims, expected uint8 [.]")
    unary_bytes = positions.numel() - (count * k + 7) // 8
    if unary_bytes < 0:
        raise ValueError(f"delta positions hold {positions.numel()} bytes, too few for {count} remainders")
    stream = unpack_indices(positions[:unary_bytes], unary_bytes * 8, 1)
    ends = (stream == 0).nonzero().flatten()[:count]  # padding after the last terminator is zeros too
    if len(ends) < count or (count and (int(ends[-1]) + 8) // 8 != unary_bytes) or (not count and unary_bytes):
        raise ValueError(f"delta positions do not hold {count} Rice-coded gaps")
    quotients = torch.diff(ends, prepend=torch.tensor([-1])) - 1
    remainders = unpack_indices(positions[unary_bytes:], count, k) if k else torch.zeros(count, dtype=torch.long)
    return (quotients << k) | remainders


def encode_delta(indices: torch.Tensor, general: torch.Tensor, candidates: int) -> dict[str, torch.Tensor]:
    """The delta-coded form of ``indices`` against ``general`` (both int ``[G]``, values ``< candidates``, the
    number of N:M patterns C): see the module docstring. Of the three codings it writes the smallest.

    Returns the :data:`DELTA_FIELDS` tensors: info int64 ``[3]``, positions uint8, new patterns uint8.
    """
    if indices.shape != general.shape:
        raise ValueError(f"Cannot delta-code {tuple(indices.shape)} pattern indices against {tuple(general.shape)}.")
    indices, general = indices.cpu().long(), general.cpu().long()
    changed = (indices != general).nonzero().flatten()  # sorted [K]
    count, bits = changed.numel(), _bits(candidates)
    gaps = torch.diff(changed, prepend=torch.tensor([-1])) - 1
    gap_bits = max(1, int(gaps.max()).bit_length()) if count else 1
    absolute = pack_indices(indices[changed], bits)
    bitmap = torch.zeros(general.numel(), dtype=torch.long)
    bitmap[changed] = 1
    options = [(DELTA_GAPS, gap_bits, pack_indices(gaps, gap_bits), absolute),
               (DELTA_BITMAP, 0, pack_indices(bitmap, 1), absolute)]  # (coding, parameter, positions, patterns)
    if count:
        k = _rice_parameter(gaps)
        ranks = indices[changed] - (indices[changed] > general[changed]).long()
        options.append((DELTA_RICE, k, _rice_positions(gaps, k), _pack_alternatives(ranks, candidates)))
    coding, parameter, positions, patterns = min(options, key=lambda o: o[2].numel() + o[3].numel())
    return {
        DELTA_INFO: torch.tensor([count, coding, parameter], dtype=torch.int64),
        DELTA_POSITIONS: positions,
        DELTA_PATTERNS: patterns,
    }


def decode_delta(tensors: dict[str, torch.Tensor], general: torch.Tensor, candidates: int) -> torch.Tensor:
    """Invert :func:`encode_delta`: apply the stored changes to ``general`` (int ``[G]``) -> int64 ``[G]``.

    Raises ``ValueError`` (without the layer name; callers add it) if the tensors are inconsistent.
    """
    info = tensors[DELTA_INFO]
    if info.dtype != torch.int64 or info.shape != (3,):
        raise ValueError(f"delta info has dtype {info.dtype} and shape {tuple(info.shape)}, expected int64 [3]")
    count, coding, gap_bits = (int(v) for v in info)
    num_groups = general.numel()
    if not 0 <= count <= num_groups:
        raise ValueError(f"delta claims {count} changed groups of {num_groups}")
    if coding == DELTA_GAPS and 1 <= gap_bits <= 63:
        changed = torch.cumsum(unpack_indices(tensors[DELTA_POSITIONS], count, gap_bits) + 1, 0) - 1
    elif coding == DELTA_BITMAP and gap_bits == 0:
        changed = unpack_indices(tensors[DELTA_POSITIONS], num_groups, 1).nonzero().flatten()
        if changed.numel() != count:
            raise ValueError(f"delta bitmap marks {changed.numel()} changed groups, its info says {count}")
    elif coding == DELTA_RICE and 0 <= gap_bits <= 62:
        changed = torch.cumsum(_rice_gaps(tensors[DELTA_POSITIONS], count, gap_bits) + 1, 0) - 1
    else:
        raise ValueError(f"unknown delta coding {coding} with gap_bits {gap_bits}")
    if count and int(changed[-1]) >= num_groups:
        raise ValueError(f"delta changes group {int(changed[-1])} of a layer with {num_groups} groups")
    indices = general.clone().long()
    if coding == DELTA_RICE:
        ranks = _unpack_alternatives(tensors[DELTA_PATTERNS], count, candidates)
        indices[changed] = ranks + (ranks >= indices[changed]).long()
    else:
        indices[changed] = unpack_indices(tensors[DELTA_PATTERNS], count, _bits(candidates))
    return indices


def encode_record(
    record: MaskRecord, n: int, m: int, general: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The tensors stored for one layer, keyed by :data:`RECORD_FIELDS` suffix.

    With ``general`` (the general mask's pattern indices, int ``[G]``) the mask is delta-coded against it.
    """
    tensors = {SHAPE: torch.tensor(record.shape, dtype=torch.int64), FINGERPRINT: record.fingerprint.float()}
    if general is None and uses_pattern_codes(n, m):
        tensors[PATTERN_CODES] = pack_codes(record.indices, num_candidates(n, m))
    elif general is None:
        tensors[PATTERN_BITS] = pack_indices(record.indices, index_bits(n, m))
    else:
        tensors.update(encode_delta(record.indices, general, num_candidates(n, m)))
    if record.logits is not None:
        tensors[LOGITS] = record.logits.float().contiguous()
    return tensors


def is_delta(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether one layer's stored tensors are delta-coded against a general mask."""
    return DELTA_INFO in tensors


def decode_record(
    name: str, tensors: dict[str, torch.Tensor], n: int, m: int, general: MaskRecord | None = None
) -> MaskRecord:
    """Parse and validate one layer's tensors (keys: :data:`RECORD_FIELDS` suffixes); clear error if corrupt.

    A delta-coded entry needs ``general``, the general mask's record for the same layer.
    """
    delta = is_delta(tensors)
    pattern_field = PATTERN_CODES if PATTERN_CODES in tensors else PATTERN_BITS
    missing = [f for f in ((*DELTA_FIELDS,) if delta else (pattern_field,)) + (SHAPE, FINGERPRINT) if f not in tensors]
    if missing:
        raise ValueError(f"Mask adapter entry for {name!r} lacks {missing}: the adapter file is incomplete or corrupt.")
    shape = tuple(int(v) for v in tensors[SHAPE].tolist())
    if len(shape) != 2 or shape[1] % m or min(shape) <= 0:
        raise ValueError(f"Mask adapter entry for {name!r} has invalid shape {shape} for {n}:{m} masks.")
    num_groups = shape[0] * shape[1] // m
    if not delta and tensors[pattern_field].dim() == 1:
        check_pattern_size(name, pattern_field, tensors[pattern_field].numel(), shape, n, m)
    try:
        if not delta and pattern_field == PATTERN_CODES:
            indices = unpack_codes(tensors[PATTERN_CODES], num_groups, num_candidates(n, m))
        elif not delta:
            indices = unpack_indices(tensors[PATTERN_BITS], num_groups, index_bits(n, m))
        elif general is None:
            raise ValueError("it is delta-coded and no general mask was given to decode it against")
        elif general.shape != shape:
            raise ValueError(f"its general mask is for weight shape {general.shape}, the entry for {shape}")
        else:
            indices = decode_delta(tensors, general.indices, num_candidates(n, m))
    except ValueError as err:
        corrupt = "" if "corrupt" in str(err) else " The adapter file is corrupt."
        raise ValueError(f"Mask adapter entry for {name!r}: {str(err).rstrip('.')}.{corrupt}") from None
    if indices.numel() and int(indices.max()) >= num_candidates(n, m):
        raise ValueError(f"Mask adapter entry for {name!r} holds pattern indices >= C({m},{n}): the file is corrupt.")
    logits = tensors.get(LOGITS)
    if logits is not None and tuple(logits.shape) != (num_groups, num_candidates(n, m)):
        raise ValueError(f"Mask adapter entry for {name!r} has logits of shape {tuple(logits.shape)}, "
                         f"expected {(num_groups, num_candidates(n, m))}.")
    return MaskRecord(shape=shape, indices=indices, fingerprint=tensors[FINGERPRINT].float(), logits=logits)


def split_records(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Separate mask-record tensors from other checkpoint entries.

    Returns ``({module_name: {field: tensor}}, rest)`` where module names have PEFT's ``base_model.model.``
    prefix removed, and ``rest`` holds the other entries (e.g. ``modules_to_save`` weights) unchanged.
    """
    records: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in state_dict.items():
        module, _, field = key.rpartition(".")
        if field in RECORD_FIELDS:
            records.setdefault(module.removeprefix(PEFT_KEY_PREFIX), {})[field] = value
        else:
            rest[key] = value
    return records, rest
