"""The native API's wire contract, without jax: request bodies in (validated into typed requests, or a
`RequestError` with the message SGLang 0.5.6 gives, see shared/reference/api-contract.md sections 3.2
and 3.3), typed outputs out (formatted as SGLang's response objects)."""

from serving.protocol.bodies import (
    DetokenizeRequest,
    TokenizeRequest,
    UpdateWeightsRequest,
    parse_abort_request,
    parse_detokenize_request,
    parse_tokenize_request,
    parse_update_weights_request,
)
from serving.protocol.errors import NOT_SUPPORTED_SUFFIX, RequestError, SchemaError, Unavailable
from serving.protocol.generate import (
    GENERATE_FIELDS,
    GenerateItem,
    NormalizedGenerate,
    parse_generate_request,
)
from serving.protocol.outputs import FinishReason, GenerateFormatter, Output
from serving.protocol.sampling import GREEDY_TEMPERATURE_EPS, SamplingParams, merge_preferred

__all__ = [
    "GENERATE_FIELDS", "GREEDY_TEMPERATURE_EPS", "NOT_SUPPORTED_SUFFIX", "DetokenizeRequest", "FinishReason",
    "GenerateFormatter", "GenerateItem", "NormalizedGenerate", "Output", "RequestError", "SamplingParams",
    "SchemaError", "Unavailable", "TokenizeRequest", "UpdateWeightsRequest", "merge_preferred", "parse_abort_request",
    "parse_detokenize_request", "parse_generate_request", "parse_tokenize_request",
    "parse_update_weights_request",
]
