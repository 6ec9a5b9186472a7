"""Fetch product pages and keep their JSON payloads on disk."""

import json
from pathlib import Path

import requests

OUT = Path("out")


def fetch(url: str) -> dict:
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    return json.loads(response.text)


def save(name: str, payload: dict) -> None:
    with open(OUT / f"{name}.json", "w") as f:
        json.dump(payload, f)


def crawl(urls: list[str]) -> None:
    for url in urls:
        data = fetch(url)
        (OUT / "last.txt").write_text(url)
        save(data["id"], data)


def slug(title: str) -> str:
    return "-".join(title.lower().split())
