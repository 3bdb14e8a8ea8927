"""The HTTP side of the service, everything but the BentoML service class itself (service.py).

- routes: the route table (kind, upload part, guard, model, key, quiet log, metric label);
- errors: the status of every error and :func:`~http_api.errors.translate`, the one way from an
  error to the failure body (native or OpenAI's, whole or streamed);
- stack: the middlewares in their order, and why;
- schemas: the native endpoints' metadata and answers;
- guard: body caps and input forms, checked before BentoML parses a request;
- admission: how many requests may be in flight;
- analysis: from media and question to the engine's token stream, for every route;
- native: the /analyze_* handler; openai_api: the /v1 routes; jobs_api: the /jobs routes;
- lifecycle, auth, metrics, request_log (and record), openapi, web_ui: the rest of the stack.
"""
