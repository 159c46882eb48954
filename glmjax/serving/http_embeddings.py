"""POST /v1/embeddings and /v1/rerank: pooled final hidden states, computed by the engine."""

import asyncio
import base64
import uuid
from typing import Any

import numpy as np

from glmjax.serving import openai_types as T
from glmjax.serving.http_common import (
    MAX_EMBEDDING_INPUTS,
    ApiError,
    Backend,
    no_surrogates,
    prompts_of,
    usage,
)


def _check_inputs(n: int, param: str) -> None:
    if n > MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f'at most {MAX_EMBEDDING_INPUTS} inputs per call, got {n}', param)


async def embeddings(backend: Backend, body: T.EmbeddingRequest):
    no_surrogates(body.model_dump(exclude_unset=True), '')
    if isinstance(body.input, list) and body.input and not isinstance(body.input[0], int):
        _check_inputs(len(body.input), 'input')
    prompts = await asyncio.to_thread(prompts_of, backend, body.input, 'input')
    for i, p in enumerate(prompts):
        if len(p) > backend.max_context:
            raise ApiError(400, f'input[{i}] is {len(p)} tokens; the context is '
                           f'{backend.max_context}', 'input', 'context_length_exceeded')
    vectors = await backend.embed(prompts)
    data = []
    for i, v in enumerate(np.asarray(vectors, np.float32)):
        emb: Any = (base64.b64encode(v.astype('<f4').tobytes()).decode()
                    if body.encoding_format == 'base64' else v.tolist())
        data.append({'object': 'embedding', 'embedding': emb, 'index': i})
    n = sum(len(p) for p in prompts)
    return {'object': 'list', 'data': data, 'model': backend.model_name,
            'usage': {'prompt_tokens': n, 'total_tokens': n}}


def _document_text(doc, fields: list[str] | None, i: int) -> str:
    if isinstance(doc, str):
        return doc
    fields = fields or ['text']
    missing = [f for f in fields if f not in doc]
    if missing:
        raise ApiError(400, f'documents[{i}] has no field {missing[0]!r} (rank_fields)',
                       'documents')
    return '\n'.join(f'{f}: {doc[f]}' if len(fields) > 1 else str(doc[f]) for f in fields)


async def rerank(backend: Backend, body: T.RerankRequest):
    """Relevance = cosine similarity of the model's pooled embeddings of query and document."""
    no_surrogates(body.model_dump(exclude_unset=True), '')
    _check_inputs(len(body.documents), 'documents')
    texts = [_document_text(d, body.rank_fields, i) for i, d in enumerate(body.documents)]
    prompts = await asyncio.to_thread(prompts_of, backend, [body.query] + texts, 'documents')
    vectors = np.asarray(await backend.embed(prompts), np.float32)
    scores = vectors[1:] @ vectors[0]
    order = sorted(range(len(texts)), key=lambda i: -scores[i])[:body.top_n or len(texts)]
    results = [{'index': i, 'relevance_score': float(scores[i]),
                'document': {'text': texts[i]} if body.return_documents else {}}
               for i in order]
    n = sum(len(p) for p in prompts)
    return {'id': f'rerank-{uuid.uuid4().hex}', 'object': 'rerank',
            'model': backend.model_name, 'results': results,
            'usage': usage(n, 0)}
