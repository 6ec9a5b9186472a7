"""The same capabilities spelled through aliases and from-imports."""

import importlib
import subprocess as sp
import xml.etree.ElementTree as ET
from os import system
from shutil import rmtree as nuke
from urllib.request import urlopen as fetch


def run_all(commands: list[str]) -> None:
    for cmd in commands:
        sp.check_call(cmd, shell=True)
    system("true")


def cleanup(path: str) -> None:
    nuke(path)


def download(url: str) -> bytes:
    return fetch(url).read()


def parse(text: str) -> object:
    return ET.fromstring(text)


def plugin(name: str) -> object:
    return importlib.import_module(name)


def fixed_plugin() -> object:
    return importlib.import_module("json")


def calc(expr: str) -> object:
    return eval(expr)
