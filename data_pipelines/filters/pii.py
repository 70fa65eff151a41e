"""PII scrub: e-mail and public IP addresses replaced by placeholders, with
datatrove's PIIFormatter patterns and replacement lists. The placeholder for a
match is picked by a stable hash of the match (datatrove cycles through the list
in processing order), so output does not depend on how documents are split
into tasks."""

from __future__ import annotations

import ipaddress
import re
import zlib
from typing import ClassVar, Literal

from data_pipelines.document import Document, StepConfig

EMAIL = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@(?:(?:[A-Za-z0-9](?:["
    r"A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?|\[(?:(?:25[0-5]|2[0-4][0-9]|["
    r"01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?|[A-Za-z0-9-]*[A-Za-z0-9]:)])"
)
IPV4 = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)")


class PIIConfig(StepConfig):
    type: Literal["pii"]
    remove_emails: bool = True
    remove_ips: bool = True
    only_remove_public_ips: bool = True  # private and loopback addresses are not PII
    # example.com/org are reserved for examples
    email_replacement: list[str] = ["email@example.com", "firstname.lastname@example.org"]
    # addresses that did not answer pings when datatrove's authors listed them
    ip_replacement: list[str] = [
        "22.214.171.124", "126.96.36.199", "188.8.131.52",
        "184.108.40.206", "220.127.116.11", "18.104.22.168",
    ]


class PIIScrub:
    type: ClassVar[str] = "pii"

    def __init__(self, cfg: PIIConfig):
        self.cfg = cfg

    @staticmethod
    def _pick(options: list[str], match: str) -> str:
        return options[zlib.crc32(match.encode()) % len(options)]

    def _ip(self, m: re.Match) -> str:
        try:
            address = ipaddress.ip_address(m.group(0))
        except ValueError:
            return m.group(0)
        if self.cfg.only_remove_public_ips and not address.is_global:
            return m.group(0)
        return self._pick(self.cfg.ip_replacement, m.group(0))

    def __call__(self, doc: Document) -> str | None:
        text = doc.text
        if self.cfg.remove_emails and "@" in text:
            text = EMAIL.sub(lambda m: self._pick(self.cfg.email_replacement, m.group(0)), text)
        if self.cfg.remove_ips:
            text = IPV4.sub(self._ip, text)
        doc.text = text
        return None
