"""The HTTP side of the service, everything but the BentoML service class itself (service.py).

- errors: the status of every error and the failure bodies (native and OpenAI's);
- schemas: the native endpoints' metadata and answers;
- guard: body caps and input forms, checked before BentoML parses a request;
- admission: how many requests may be in flight;
- analysis: from media and question to the engine's token stream, for every route;
- openai_api: the OpenAI-compatible routes under /v1.
"""
