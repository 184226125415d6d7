"""A small Python client of the service: ``pyinv.Client("http://127.0.0.1:8000")``."""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Sequence
from typing import Any

from ..errors import PyinvError


class ServiceRefused(PyinvError):
    """The service answered with an error: its HTTP ``status`` and the problem's detail."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class Client:
    """Calls a running ``pyinv serve``. ``api_key``: the bearer token, when the service has one."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 600.0, **kw):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = kw.pop("http", None) or httpx.Client(base_url=url, headers=headers, timeout=timeout, **kw)
        if api_key and "authorization" not in self._http.headers:
            self._http.headers.update(headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _checked(self, response) -> Any:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ServiceRefused(response.status_code, str(detail))
        return response.json()

    def invert(
        self,
        image,
        source_prompt: str = "",
        method: str = "direct",
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        psnr: bool = True,
        **options: Any,
    ) -> dict[str, Any]:
        """Invert ``image`` (a path, bytes or a PIL image): the service's answer (``id``, …)."""
        if isinstance(image, str | os.PathLike):
            with open(image, "rb") as f:
                data = f.read()
        elif isinstance(image, bytes | bytearray):
            data = bytes(image)
        else:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            data = buf.getvalue()
        fields = {"source_prompt": source_prompt, "method": method, "options": json.dumps(options), "psnr": str(psnr)}
        for name, value in (("steps", steps), ("guidance", guidance), ("seed", seed)):
            if value is not None:
                fields[name] = str(value)
        return self._checked(self._http.post("/v1/inversions", data=fields, files={"image": ("image", data)}))

    def edit(
        self,
        inversion_id: str,
        targets: str | Sequence[str],
        control: str | dict | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Edit an inversion: the service's answer, with ``images`` decoded to PIL images."""
        from PIL import Image

        body = {
            "inversion_id": inversion_id,
            "targets": [targets] if isinstance(targets, str) else list(targets),
            "control": control,
            "guidance": guidance,
            "seed": seed,
            "options": options,
        }
        out = self._checked(self._http.post("/v1/edits", json=body))
        for item in out["images"]:
            item["image"] = Image.open(io.BytesIO(base64.b64decode(item["png_base64"]))).convert("RGB")
        return out

    def inversion(self, inversion_id: str) -> dict[str, Any]:
        return self._checked(self._http.get(f"/v1/inversions/{inversion_id}"))

    def delete(self, inversion_id: str) -> dict[str, Any]:
        return self._checked(self._http.delete(f"/v1/inversions/{inversion_id}"))

    def models(self) -> dict[str, Any]:
        return self._checked(self._http.get("/v1/models"))

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200
