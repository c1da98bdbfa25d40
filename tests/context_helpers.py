"""Documents the context tests ingest: PDFs with (or without) a text layer, written by pypdf itself."""

from __future__ import annotations

import io


def make_pdf(pages: list[list[str]]) -> bytes:
    """A PDF with a Helvetica text layer per page (no lines: a page with no text, like a scan), written by pypdf."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    font = {NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica")}
    for lines in pages:
        page = writer.add_blank_page(612, 792)
        if lines:
            page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject({
                NameObject("/F1"): DictionaryObject(font)})})
            stream = DecodedStreamObject()
            stream.set_data(("BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({line}) '" for line in lines) + " ET")
                            .encode())
            page.replace_contents(stream)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
