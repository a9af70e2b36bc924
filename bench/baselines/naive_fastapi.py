"""A naive model service, written the way a typical tutorial writes one.

FastAPI with a pydantic body, the model loaded once at startup (as in FastAPI's lifespan example),
and one ``predict_proba`` call per request, on the event loop: no batching, no admission control,
no deadline. Served by uvicorn::

    BENCH_MODEL_PATH=models/iris/1/model.joblib uvicorn bench.baselines.naive_fastapi:app
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import joblib
from fastapi import FastAPI
from pydantic import BaseModel

MODEL_PATH = Path(os.environ.get("BENCH_MODEL_PATH", "models/iris/1/model.joblib"))
MODEL_VERSION = MODEL_PATH.parent.name

model: Any = None


class PredictRequest(BaseModel):
    features: list[float]
    request_id: str | None = None


class PredictResponse(BaseModel):
    prediction: int
    confidence: float
    model_version: str
    request_id: str


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    global model
    model = joblib.load(MODEL_PATH)
    yield


app = FastAPI(title="naive iris service", lifespan=lifespan)


@app.post("/predict", response_model=PredictResponse)
async def predict(request: PredictRequest) -> PredictResponse:
    probabilities = model.predict_proba([request.features])[0]
    best = int(probabilities.argmax())
    return PredictResponse(
        prediction=int(model.classes_[best]),
        confidence=float(probabilities[best]),
        model_version=MODEL_VERSION,
        request_id=request.request_id or str(uuid.uuid4()),
    )
