"""kvmem inside vLLM: ``kvmem.vllm.connector.KVMemConnector``, a v1 KV connector.

Importing this package imports nothing from vLLM; ``kvmem.vllm.connector`` does (it runs in
vLLM's processes, named by ``kv_connector_module_path="kvmem.vllm.connector"``).
"""
