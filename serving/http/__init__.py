"""The HTTP layer: a Sanic app over `Engine` (app.py: auth, errors, lifecycle), SGLang's native routes
(native.py) and the OpenAI-compatible ones (openai.py). Routes only parse, call engine methods and
format; validation lives in `serving.protocol`."""
