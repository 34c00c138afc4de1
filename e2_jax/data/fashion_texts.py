"""A corpus of fashion strings (tokenizer parity tests, the tokenizer and train-step benchmarks):
FashionGen-style records plus hard cases.

Hand-written edge cases (latin-1 accents, HTML entities, mojibake, emoji, control and
whitespace characters, very long texts, empty strings) and deterministic combinations of
FashionGen-like fields, including the E² global text `composition.subcategory.brand.season.
description` and its raw tag strings.
"""

from __future__ import annotations

import random

EDGE_CASES = [
    "",
    " ",
    "\t\n\r ",
    "SHIRTS",
    "Raf Simons",
    "FW2016",
    "SS2017",
    "96% cotton, 4% polyurethane.",
    "100% lambskin. Lining: 100% cupro.",
    "Shell: 75% wool, 25% polyamide. Trim: 100% calfskin leather.",
    "Long sleeve cotton-blend shirt in black. Spread collar. Button closure at front.",
    "Comme des Garçons Shirt",
    "Maison Margiela",
    "Acne Studios",
    "Saint Laurent",
    "Kenzo",
    "Y-3",
    "A.P.C.",
    "Ami Alexandre Mattiussi",
    "Alexander McQueen",
    "Isabel Marant Étoile",
    "Thom Browne",
    "Vêtements",
    "Jil Sander Navy",
    "Off-White",
    "Moncler Gamme Bleu",
    "Maison Kitsuné",
    "Y's",
    "Chloé",
    "Loewe",
    "Dsquared2",
    "Sacai",
    "Ann Demeulemeester",
    "Façonnable",
    "Björn Borg",
    "Søren Lyngsø",
    "Åre Cashmere",
    "Müller & Söhne",
    "Señorita de la Peña",
    "Crêpe de Chine blouse in ivory. Pleated détail at yoke. Côte d'Azur print.",
    "Jersey 'Smiley' t-shirt in white. Rib knit crewneck collar. Logo printed in black at front.",
    "Black & white striped pullover",
    "Black &amp; white striped pullover",
    "Black &amp;amp; white",
    "Tom &amp;amp;amp; Jerry",
    "5 &lt; 6 &gt; 4",
    "&quot;Oversized&quot; fit &#8212; drop shoulder",
    "&eacute;t&eacute; collection",
    "&nbsp;&nbsp;leading entities",
    "AT&T logo tee",
    "R&D <b>bold</b> label",
    "Ã©tÃ© collection â€” cafÃ©",
    "sweatshirt â€œlogoâ€\x9d embroidered",
    "Ã\xa0 la mode",
    "Men's \u201cclassic\u201d oxford \u2018shirt\u2019",
    "Women\u2019s trench coat",
    "Fullwidth ＡＢＣ　ｄｅｆ １２３",
    "ligature ﬁne ﬂoral",
    "non\u00a0breaking\u00a0space",
    "em\u2003space and thin\u2009space",
    "zero\u200bwidth\u200bjoiner",
    "tab\tseparated\tfields",
    "line one\nline two\r\nline three\rline four",
    "control\x00chars\x07here\x1b[31m red \x1b[0m",
    "del\x7fchar",
    "\x1c\x1d\x1e\x1f separators",
    "emoji 👗👠👜🧥✨",
    "family 👨‍👩‍👧 and flag 🇫🇷",
    "skin tones 👍🏽👍🏿",
    "中文 描述 连衣裙",
    "日本語のテキスト ワンピース",
    "한국어 드레스",
    "Русский текст: платье",
    "Ελληνικά: φόρεμα",
    "עברית שמלה",
    "العربية فستان",
    "हिन्दी पोशाक",
    "ΣΊΣΥΦΟΣ final sigma",
    "İstanbul ıi TURKISH",
    "STRASSE straße ẞ",
    "numbers 1234567890 ½ ² ³ ⅓ ٣",
    "prices $1,299.00 €450 £300 ¥20000",
    "sizes: XS/S/M/L/XL, EU 38-46, US 0-12",
    "it's they're we've I'm you'll he'd",
    "IT'S THEY'RE WE'VE I'M YOU'LL HE'D",
    "punctuation!!! ??? ... --- ___ *** ### @@@",
    "email@example.com https://www.ssense.com/en-us/men/product/raf-simons/shirt/123",
    "<start_of_text> literal special tokens <end_of_text>",
    "<|startoftext|> OpenAI spelling <|endoftext|>",
    "a" * 300,
    "supercalifragilisticexpialidocious " * 20,
    " ".join(["Long sleeve wool-blend jacket in charcoal grey."] * 12),
    "word " * 80,
    "ΑΒΓ " * 60,
    "👗" * 100,
    "....................................................................................................",
]

_BRANDS = ["Raf Simons", "Comme des Garçons", "Maison Margiela", "Acne Studios", "Saint Laurent",
           "Givenchy", "Balenciaga", "Kenzo", "Chloé", "Isabel Marant Étoile", "Y-3", "A.P.C.",
           "Thom Browne", "Off-White", "Vêtements", "Loewe", "Marni", "Sacai", "Rick Owens",
           "Dries Van Noten"]
_SUBCATEGORIES = ["SHIRTS", "T-SHIRTS", "SWEATERS", "JACKETS & COATS", "JEANS", "PANTS", "DRESSES",
                  "SKIRTS", "SNEAKERS", "BOOTS", "BAGS", "TOPS", "SHORTS", "SUITS & BLAZERS",
                  "HATS"]
_SEASONS = ["SS2015", "FW2015", "SS2016", "FW2016", "SS2017", "FW2017", "Resort 2017"]
_COMPOSITIONS = ["100% cotton.", "96% cotton, 4% polyurethane.", "100% wool. Lining: 100% cupro.",
                 "Shell: 70% polyester, 30% nylon. Fill: 90% goose down, 10% feathers.",
                 "100% lambskin.", "55% linen, 45% cotton.", "Calfskin leather. Rubber sole.",
                 "80% viscose, 20% élasthanne.", "100% silk.", "Upper: textile. Sole: rubber."]
_COLOURS = ["black", "white", "navy", "charcoal grey", "ivory", "burgundy", "olive", "camel",
            "beige", "indigo", "écru", "rose", "multicolor"]
_GARMENTS = ["shirt", "t-shirt", "sweater", "jacket", "coat", "jeans", "trousers", "dress",
             "skirt", "sneakers", "boots", "tote", "blazer", "hoodie", "cardigan"]
_DETAILS = ["Spread collar.", "Button closure at front.", "Logo embroidered at chest.",
            "Rib knit crewneck collar, cuffs, and hem.", "Zip closure at front.",
            "Welt pockets at waist.", "Tonal stitching.", "Patch pocket at chest.",
            "Logo patch at back waistband.", "Signature striped webbing trim.",
            "Drop shoulder.", "Dropped tail hem.", "Lace-up closure.", "Tonal rubber sole.",
            "Adjustable buckled strap at waist.", "Raw-edge hem.", "Pleats at front.",
            "Graphic printed in red at back.", "Silver-tone hardware.", "Single-button barrel cuffs."]


def fashion_records(n: int = 160, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        colour, garment = rng.choice(_COLOURS), rng.choice(_GARMENTS)
        details = " ".join(rng.sample(_DETAILS, rng.randint(1, 8)))
        fit = rng.choice(["Long sleeve", "Short sleeve", "Sleeveless", "Oversized", "Slim-fit",
                          "Relaxed-fit", "Cropped"])
        records.append({
            "brand": rng.choice(_BRANDS), "subcategory": rng.choice(_SUBCATEGORIES),
            "season": rng.choice(_SEASONS), "composition": rng.choice(_COMPOSITIONS),
            "description": f"{fit} {garment} in {colour}. {details}",
        })
    return records


def corpus() -> list[str]:
    """At least 200 strings: edge cases, FashionGen-like descriptions, E² global texts."""
    texts = list(EDGE_CASES)
    for r in fashion_records():
        texts.append(r["description"])
        # The E² global text for FashionGen (E2_METHOD.md section 3): fields joined by dots.
        texts.append(".".join([r["composition"], r["subcategory"], r["brand"], r["season"],
                               r["description"]]))
    return texts
