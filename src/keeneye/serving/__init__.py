"""REST serving of a model bundle (FastAPI + uvicorn): `create_app`, `ServeSettings`, `serve`."""

from keeneye.serving.settings import ServeSettings, make_settings

__all__ = ["ServeSettings", "make_settings", "create_app", "serve"]


def __getattr__(name):  # FastAPI and uvicorn are imported only when the app is actually built
    if name == "create_app":
        from keeneye.serving.app import create_app

        return create_app
    if name == "serve":
        from keeneye.serving.server import serve

        return serve
    raise AttributeError(name)
