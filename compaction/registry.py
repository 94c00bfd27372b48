"""Imports every compaction method module so that each registers itself with ``compaction.base.REGISTRY``.

``make_compactor`` imports this module; a new method module only needs one import line here.
"""
import compaction.attention_matching  # noqa: F401 - attention_matching
import compaction.eviction  # noqa: F401 - streaming_llm, h2o, snapkv, tova, knorm, random
