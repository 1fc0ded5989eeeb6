"""POST /tokenize and /detokenize (vLLM's): the token ids a prompt or a chat would be run as,
so a client can count and check them, and the text of token ids."""

from __future__ import annotations

import asyncio

from .chat import dialog, dialog_param
from .errors import bad_request
from .generation import ServerContext
from .protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)


async def tokenize(ctx: ServerContext, body: TokenizeRequest) -> TokenizeResponse:
    ctx.check_model(body.model)
    try:
        if body.messages is not None:
            chat = ChatCompletionRequest(model=body.model, messages=body.messages, tools=body.tools,
                                         add_generation_prompt=body.add_generation_prompt,
                                         continue_final_message=body.continue_final_message,
                                         chat_template_kwargs=body.chat_template_kwargs)
            messages, tools = dialog(chat)
            ids = await asyncio.to_thread(ctx.llm.chat_format.encode_dialog, messages, tools,
                                          add_generation_prompt=chat.generation_prompt,
                                          continue_final_message=chat.continue_final_message,
                                          chat_template_kwargs=ctx.chat_template_kwargs(chat.chat_template_kwargs))
        elif body.add_special_tokens:
            ids = await asyncio.to_thread(ctx.llm.encode_prompt, body.prompt)
        else:
            ids = await asyncio.to_thread(ctx.tokenizer.encode, body.prompt, allow_special=True)
    except ValueError as e:  # an empty prompt, a dialog the chat format refuses, no chat format
        raise bad_request(str(e), dialog_param(e) if body.messages is not None else "prompt") from None
    strs = [ctx.token_text(t) for t in ids] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=ctx.max_seq_len, tokens=ids, token_strs=strs)


async def detokenize(ctx: ServerContext, body: DetokenizeRequest) -> DetokenizeResponse:
    ctx.check_model(body.model)
    vocab = ctx.tokenizer.vocab_size
    outside = [t for t in body.tokens if t >= vocab]
    if outside:
        raise bad_request(f"token ids past the vocabulary ({vocab} tokens): {outside[:5]}", "tokens")
    return DetokenizeResponse(prompt=ctx.tokenizer.decode(body.tokens))
