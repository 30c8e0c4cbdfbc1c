"""Attention maps as extra model outputs: moved to ``qcexport.export.maps`` (convert's
``with_attention_maps`` needs them, and the export layer must not import diagnostics).
Re-exported here while code still imports them from this address."""

from qcexport.export.maps import (  # noqa: F401
    DESCRIPTOR_FORMAT,
    HEAD_MODES,
    KEY_KINDS,
    MAP_PREFIX,
    AttentionMaps,
    Extra,
    MapPlan,
    MapSite,
    Taps,
    attention_probs,
    plan_for,
    spec_with_maps,
    with_attention_maps,
)
