"""Natural text and MT-Bench-format files that live in the repository.

Tests and benchmarks must run from a clone with nothing beside it, so nothing
here reads a file outside the repository (``tests/test_no_outside_paths.py``
keeps it that way). Two things are provided:

- **Natural chat text** (:func:`natural_conversations`): hand-written questions
  and long answers in the eight MT-Bench categories (prose, lists, markdown
  tables, code, arithmetic, several scripts and languages, emoji, runs of
  spaces, tabs and blank lines), padded with the installed Python's own
  standard-library docstrings (prose with code, numbers and whitespace).
  Alignment tests and ``benchmarks/align.py`` use it: the cases that make two
  tokenizers disagree are all in there.
- **MT-Bench files** (:func:`write_mt_bench`): ``question.jsonl``, reference
  answers and ``judge_prompts.jsonl`` in FastChat's formats (same fields, the
  same judge prompt names, placeholders and verdict formats), with question
  ids in FastChat's per-category ranges (writing 81-90, roleplay 91-100,
  reasoning 101-110, math 111-120, coding 121-130, extraction 131-140, stem
  141-150, humanities 151-160). The runtime default stays FastChat's published
  files (``evaluate.mt_bench_data: null``).
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

# (question_id, category, (turn 1, turn 2), (answer 1, answer 2)). Answers of the
# reference categories (math, reasoning, coding) are the reference answers.
QUESTIONS: list[tuple[int, str, tuple[str, str], tuple[str, str]]] = [
    (81, "writing",
     ("Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
      "experiences and must-see attractions.",
      "Rewrite your previous response. Start every sentence with the letter A."),
     ("Aloha from the Big Island! 🌺 I spent ten days on Hawai'i, and the highlight was not a beach but "
      "a morning at a lo'i kalo (taro terrace) near Waipi'o, where volunteers taught us how poi is made.\n\n"
      "## Must-see\n\n1. **Volcanoes National Park**: walk the Kīlauea Iki trail (4 miles, ~3 hours).\n"
      "2. **Pu'uhonua o Hōnaunau**: a place of refuge, rebuilt with 18th-century techniques.\n"
      "3. **Mauna Kea**: stargazing at 9,200 ft; bring a jacket, it's 40°F after sunset!\n\n"
      "Mahalo for reading — and please respect the kapu signs.",
      "Aloha from the Big Island, a place I adored. A morning at a taro terrace taught us how poi is made. "
      "Above all, Volcanoes National Park amazed me. A walk across Kīlauea Iki takes about 3 hours. "
      "Afterwards, Mauna Kea's sky offered astonishing stars.")),
    (82, "writing",
     ("Draft a professional email seeking your supervisor's feedback on the 'Quarterly Financial Report' "
      "you prepared. Ask specifically about the data analysis, presentation style, and the clarity of "
      "conclusions drawn. Keep the email short and to the point.",
      "Take a moment to evaluate and critique your own response."),
     ("Subject: Feedback request — Quarterly Financial Report (Q3)\n\nHi Maria,\n\nI've attached the Q3 "
      "report. Could you share your thoughts on:\n\n- the data analysis (esp. the 12.5% YoY revenue growth "
      "and the cost breakdown in Table 4);\n- the presentation style;\n- whether the conclusions follow "
      "clearly from the numbers?\n\nThanks,\nSam",
      "Strengths: it is short, names the three areas, and points to a concrete table. Weaknesses: it gives "
      "no deadline, and \"thoughts\" is vague; asking \"Is anything unclear or unsupported?\" would get a "
      "sharper answer.")),
    (83, "writing",
     ("Imagine you are writing a blog post comparing two popular smartphone models. Develop an outline "
      "for the blog post, including key points and subheadings, in fewer than 200 words.",
      "Take your previous response and rephrase it as a limerick."),
     ("# Phone A vs Phone B\n\nI. Introduction\n\tA. Why compare them\nII. Design\n\tA. Size & weight "
      "(171 g vs 187 g)\n\tB. Build materials\nIII. Display\n\tA. 6.1\" OLED @ 120 Hz vs 6.4\" AMOLED\n"
      "IV. Performance & battery\nV. Camera\nVI. Price ($799 vs $699)\nVII. Verdict",
      "Two phones went head-to-head one day,\nIn design, screen and camera array;\nOne was lighter by far,\n"
      "One was cheaper — hurrah!\nSo which one you'll buy, who can say?")),
    (84, "writing",
     ("Write a persuasive email to convince your introverted friend, who dislikes public speaking, to "
      "volunteer as a guest speaker at a local event.",
      "Can you rephrase your previous answer and incorporate a metaphor or simile in each sentence?"),
     ("Hey Jo,\n\nThe library's \"Stories of Our Town\" night (Thu 7 pm) needs a 10-minute talk, and "
      "nobody knows the old mill's history like you. It's 25 people, a friendly crowd, and you can read "
      "from notes. I'll rehearse with you twice beforehand.\n\nSay yes?\n— Alex",
      "Your knowledge of the mill is a lantern in a dark archive. The crowd will be as gentle as a "
      "Sunday-morning tide. Your notes can be a handrail on a steep stair.")),
    (91, "roleplay",
     ("Pretend yourself to be Elon Musk in all the following conversations. Speak like Elon Musk as much "
      "as possible. Why do we need to go to Mars?",
      "How do you like dancing? Can you teach me?"),
     ("We need to become a multi-planetary species. Earth is great, but single-planet civilisations are "
      "fragile: one asteroid, one supervolcano, and it's game over. Mars is the next best option...",
      "Haha, I'm a pretty terrible dancer, honestly. But the trick is: don't overthink it. Just move.")),
    (92, "roleplay",
     ("Embrace the role of Sheldon from \"The Big Bang Theory\" as we delve into our conversation. Don't "
      "start with phrases like \"As Sheldon\". Let's kick things off with the following question: \"What is "
      "your opinion on hand dryers?\"",
      "Let's grab dinner in town. Would you like to take bus with me?"),
     ("Hand dryers are a marvel of convenience and a catastrophe of microbiology. Studies suggest jet "
      "dryers may disperse up to 1,300 times more viral particles than paper towels. Bazinga? No: science.",
      "Public transit is a rolling petri dish. However, if we sit in the third row, away from the "
      "rear door's draught, I may consent.")),
    (101, "reasoning",
     ("Imagine you are participating in a race with a group of people. If you have just overtaken the "
      "second person, what's your current position? Where is the person you just overtook?",
      "If the \"second person\" is changed to \"last person\" in the above question, what would the answer be?"),
     ("You are in second place. The person you just overtook is now in third place.",
      "Overtaking the last person is impossible: if you were behind them, they were not last. The "
      "question is a trick; there is no valid answer.")),
    (102, "reasoning",
     ("You can see a beautiful red house to your left and a hypnotic greenhouse to your right, an "
      "attractive heated pink place in the front. So, where is the White House?",
      "Does the original question contain any clues to definitively determine the location of the White House?"),
     ("The White House is at 1600 Pennsylvania Avenue NW in Washington, D.C.; the houses described are "
      "unrelated to it.",
      "No. The question describes colours and directions only; none of it locates the White House.")),
    (111, "math",
     ("The vertices of a triangle are at points (0, 0), (-1, 1), and (3, 3). What is the area of the triangle?",
      "What's area of the circle circumscribing the triangle?"),
     ("Area = 1/2 |x1(y2 - y3) + x2(y3 - y1) + x3(y1 - y2)|\n= 1/2 |0(1 - 3) + (-1)(3 - 0) + 3(0 - 1)|\n"
      "= 1/2 |-3 - 3| = 3.",
      "The sides are √2, √20 and √18; since 2 + 18 = 20 the triangle is right-angled, so the hypotenuse "
      "√20 is a diameter: r = √5 and the area is 5π ≈ 15.71.")),
    (112, "math",
     ("A tech startup invests $8000 in software development in the first year, and then invests half of "
      "that amount in software development in the second year. What's the total amount the startup "
      "invested in software development over the two years?",
      "If the startup maintains the same strategy for the third year, investing half of the previous "
      "year's amount into software development, how much will they invest in the third year?"),
     ("Year 1: $8000. Year 2: $8000 / 2 = $4000. Total: $8000 + $4000 = $12000.",
      "Year 3: $4000 / 2 = $2000.")),
    (121, "coding",
     ("Develop a Python program that reads all the text files under a directory and returns top-5 words "
      "with the most number of occurrences.",
      "Can you parallelize it?"),
     ("```python\nimport os\nimport re\nfrom collections import Counter\n\n\ndef top_words(folder, n=5):\n"
      "    counts = Counter()\n    for name in os.listdir(folder):\n        if name.endswith(\".txt\"):\n"
      "            with open(os.path.join(folder, name), encoding=\"utf-8\") as f:\n"
      "                counts.update(re.findall(r\"\\w+\", f.read().lower()))\n"
      "    return counts.most_common(n)\n```",
      "```python\nfrom concurrent.futures import ProcessPoolExecutor\n\n\ndef count_file(path):\n"
      "    with open(path, encoding=\"utf-8\") as f:\n"
      "        return Counter(re.findall(r\"\\w+\", f.read().lower()))\n\n\n"
      "def top_words(folder, n=5):\n"
      "    paths = [os.path.join(folder, p) for p in os.listdir(folder) if p.endswith(\".txt\")]\n"
      "    with ProcessPoolExecutor() as pool:\n        total = sum(pool.map(count_file, paths), Counter())\n"
      "    return total.most_common(n)\n```")),
    (122, "coding",
     ("Write a C++ program to find the nth Fibonacci number using recursion.",
      "Now we define a sequence of numbers in which each number is the sum of the three preceding ones. "
      "The first three numbers are 0, -1, -1. Write a program to find the nth number."),
     ("```cpp\n#include <iostream>\n\nint fib(int n) {\n\tif (n <= 1) return n;\n\treturn fib(n - 1) + "
      "fib(n - 2);\n}\n\nint main() {\n\tint n;\n\tstd::cin >> n;\n\tstd::cout << fib(n) << std::endl;\n}\n```",
      "```cpp\nint trib(int n) {\n\tif (n == 0) return 0;\n\tif (n <= 2) return -1;\n\treturn trib(n - 1) + "
      "trib(n - 2) + trib(n - 3);\n}\n```\nThe sequence starts 0, -1, -1, -2, -4, -7, -13, -24.")),
    (131, "extraction",
     ("Evaluate the following movie reviews on a scale of 1 to 5, with 1 being very negative, 3 being "
      "neutral, and 5 being very positive:\n1. This movie released on Nov. 18, 2019, was phenomenal.\n"
      "2. Never before have I been so disappointed with a movie.\n3. The movie was okay.\n"
      "Return the answer as a JSON array of integers.",
      "Update your previous reply by including the release date as part of the JSON content."),
     ("[5, 1, 3]",
      "[{\"rating\": 5, \"release_date\": \"2019-11-18\"}, {\"rating\": 1, \"release_date\": null}, "
      "{\"rating\": 3, \"release_date\": null}]")),
    (132, "extraction",
     ("Extract the following information from the presented texts: the name of the book, the author, "
      "the main character, the year of publication. Output in the format of \"main character, book, "
      "author, year of publication\", one book per line.",
      "Reformulate your earlier reply, output it in JSON format and only include books published after 1980."),
     ("Harry Potter, Harry Potter and the Philosopher's Stone, J.K. Rowling, 1997\n"
      "Frodo Baggins, The Lord of the Rings: The Fellowship of the Ring, J.R.R. Tolkien, 1954\n"
      "Zylo, The Prism Galaxy Chronicles: The Awakening of the Starcaster, L.E. Starlighter, 2028",
      "{\"books\": [{\"main_character\": \"Harry Potter\", \"year\": 1997}, "
      "{\"main_character\": \"Zylo\", \"year\": 2028}]}")),
    (141, "stem",
     ("In the field of quantum physics, what is superposition, and how does it relate to the phenomenon "
      "of quantum entanglement?",
      "What assumptions have you made in your response? Are they valid?"),
     ("Superposition: a quantum system can be in a linear combination of states, |ψ⟩ = α|0⟩ + β|1⟩, with "
      "|α|² + |β|² = 1. Entanglement: a joint state such as (|00⟩ + |11⟩)/√2 that cannot be written as a "
      "product of single-particle states — superposition at the level of the pair.",
      "I assumed the standard (Copenhagen-style) textbook framing and ideal, noise-free systems; both are "
      "fine for an introduction, less so for real hardware with decoherence times of ~100 μs.")),
    (142, "stem",
     ("Consider a satellite that is in a circular orbit around the Earth. The speed of the satellite "
      "decreases. What will happen to the satellite's orbital radius and period of revolution? Please "
      "justify your answer using principles of physics.",
      "What are some corner cases or edge cases in your solution? How do you handle them?"),
     ("For a circular orbit v = √(GM/r): a lower speed at the same radius means gravity exceeds the "
      "needed centripetal force, so the satellite falls to a lower orbit, r decreases, and by Kepler's "
      "third law (T² ∝ r³) the period decreases.",
      "Edge cases: a drop to v = 0 (straight fall), atmospheric drag at r < 6,571 km, and non-circular "
      "resulting orbits (an ellipse with the old radius as apogee).")),
    (151, "humanities",
     ("Provide insights into the correlation between economic indicators such as GDP, inflation, and "
      "unemployment rates. Explain how fiscal and monetary policies affect those indicators.",
      "Now, explain them again like I'm five."),
     ("| indicator | rises when | policy lever |\n|---|---|---|\n| GDP | demand, investment | fiscal |\n"
      "| inflation | demand > supply | monetary (rates) |\n| unemployment | demand falls | both |\n\n"
      "Okun's law: roughly, each 1 pp of unemployment above normal costs ~2 pp of GDP.",
      "When people buy lots of toys, toy shops hire more helpers (fewer people without jobs), but toys "
      "can get pricier. The government and the bank can turn the \"buying\" tap up or down.")),
    (152, "humanities",
     ("How do the stages of life shape our understanding of time and mortality?",
      "Write an allegorical poem that illustrates the above."),
     ("Childhood feels timeless; youth measures time in milestones; midlife notices it running out; old "
      "age often reframes it as legacy. Montaigne: « Philosopher, c'est apprendre à mourir. »",
      "A river began as a spring that could not count,\nit ran to the plain and measured its banks,\n"
      "and at the sea it learned it had never been lost.")),
]

# More natural text: several scripts and languages, emoji, markup, whitespace runs.
EXTRA_TEXTS: list[str] = [
    "Bonjour ! Pouvez-vous m'expliquer la différence entre « savoir » et « connaître » ? — Bien sûr : "
    "« savoir » s'emploie pour un fait, « connaître » pour une personne ou un lieu.",
    "Straße, Größe, Übermäßig: im Deutschen schreibt man nach langem Vokal „ß“, nach kurzem „ss“ (Fluss).",
    "¿Cuál es la capital de Perú? Lima, fundada en 1535; tiene unos 10 millones de habitantes.",
    "机器学习是人工智能的一个分支。它让计算机从数据中学习，而不是被明确编程。例如：垃圾邮件过滤。",
    "東京は日本の首都です。人口は約1400万人で、世界最大級の都市圏を形成しています。",
    "Москва — столица России. Население: около 13 миллионов человек (2021).",
    "مرحبا! كيف حالك؟ أنا بخير، شكرا.",
    "नमस्ते! आप कैसे हैं? मैं ठीक हूँ।",
    "Emoji test: 🎉🎉 party time 🥳! Flags 🇫🇷🇯🇵, family 👨‍👩‍👧‍👦, skin tones 👍🏽, and ❤️ with a variation selector.",
    "Whitespace runs:    four spaces,\t\ttwo tabs,\n\n\n\nfour newlines, and trailing spaces   \n  then an indent.",
    "| col A | col B |\n|------:|:------|\n|   1.5 | x     |\n|  -2   | y     |\n\n> a quote\n>> nested",
    "$ pip install -U 'numpy>=1.26' && python -c \"import numpy as np; print(np.__version__)\"\n1.26.4",
    "def f(x: int) -> int:\n    \"\"\"Return x squared.\"\"\"\n    return x ** 2\n\n\n"
    "assert f(12) == 144, 'bad square'",
    "SELECT name, COUNT(*) AS n\nFROM orders\nWHERE created_at >= '2024-01-01'\nGROUP BY name\nHAVING n > 3;",
    "{\"id\": 42, \"tags\": [\"a\", \"b\"], \"nested\": {\"ok\": true, \"ratio\": 0.125}}",
    "Numbers: 3.14159, 2.71828, 1e-9, 6.022e23, 1,000,000, 0x1F, 0b1010, -0.0, 100%, ½, ¾, ① ② ③.",
    "URLs and paths: https://example.com/a/b?c=d&e=f#g, ./data/train.jsonl, C:\\Users\\me\\file.txt",
    "He said, \"It's not what you'd think.\" She'd replied: 'won't', 'can't', 'y'all' — and left.",
    "Bullying is not okay; cyberbullying isn't either. Unbelievably, anti-bullying programmes work.",
]

_DOC_MODULES = ("json", "collections", "itertools", "functools", "textwrap", "argparse", "logging", "pathlib",
                "re", "subprocess", "dataclasses", "typing", "asyncio", "unittest", "csv", "datetime", "decimal",
                "fractions", "heapq", "bisect", "string", "statistics", "shutil", "tempfile", "zipfile")

# FastChat's judge prompt names, placeholders and verdict formats (single grading with and
# without a reference, one and two turns; pairwise, which we do not use, is left out).
_SINGLE = ("Please act as an impartial judge and evaluate the response of an AI assistant. Begin with a short "
           "explanation, then rate the response on a scale of 1 to 10 by strictly following this format: "
           "\"[[rating]]\", for example: \"Rating: [[5]]\".")
JUDGE_PROMPTS: list[dict] = [
    {"name": "single-v1", "type": "single", "system_prompt": "You are a helpful assistant.",
     "prompt_template": "[Instruction]\n" + _SINGLE + "\n\n[Question]\n{question}\n\n[The Start of Assistant's "
     "Answer]\n{answer}\n[The End of Assistant's Answer]",
     "description": "Prompt for general questions", "category": "general", "output_format": "[[rating]]"},
    {"name": "single-math-v1", "type": "single", "system_prompt": "You are a helpful assistant.",
     "prompt_template": "[Instruction]\n" + _SINGLE + " Compare it with the reference answer.\n\n[Question]\n"
     "{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference Answer]\n\n"
     "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
     "description": "Prompt for general questions", "category": "math", "output_format": "[[rating]]"},
    {"name": "single-v1-multi-turn", "type": "single",
     "system_prompt": _SINGLE + " Focus on the answer to the second user question.\n\n",
     "prompt_template": "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n"
     "### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
     "<|The End of Assistant A's Conversation with User|>",
     "description": "Prompt for general questions", "category": "general", "output_format": "[[rating]]"},
    {"name": "single-math-v1-multi-turn", "type": "single",
     "system_prompt": _SINGLE + " Compare it with the reference answers; focus on the second question.\n\n",
     "prompt_template": "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n"
     "{ref_answer_1}\n\n### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n<|The End of "
     "Reference Answer|>\n\n\n<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n"
     "### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
     "<|The End of Assistant A's Conversation with User|>",
     "description": "Prompt for general questions", "category": "math", "output_format": "[[rating]]"},
]

REFERENCE_CATEGORIES = ("math", "reasoning", "coding")


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_mt_bench(folder: Path, *, layout: str = "flat", qids: list[int] | None = None) -> Path:
    """MT-Bench files under ``folder``; returns the location to pass as ``mt_bench_data``.

    ``layout="flat"``: ``question.jsonl``, ``reference_answer_gpt-4.jsonl`` and
    ``judge_prompts.jsonl`` side by side (returns ``folder``). ``layout="fastchat"``:
    FastChat's ``data/`` tree, ``mt_bench/question.jsonl``,
    ``mt_bench/reference_answer/gpt-4.jsonl`` and ``judge_prompts.jsonl`` (returns
    ``folder / "mt_bench"``). ``qids`` keeps only those questions (references are
    always written in full, as FastChat ships them)."""
    folder = Path(folder)
    questions = [{"question_id": q, "category": c, "turns": list(t)} for q, c, t, _ in QUESTIONS
                 if qids is None or q in qids]
    refs = [{"question_id": q, "answer_id": f"ref-{q}", "model_id": "gpt-4",
             "choices": [{"index": 0, "turns": list(a)}], "tstamp": 1687221890.0 + q}
            for q, c, _, a in QUESTIONS if c in REFERENCE_CATEGORIES]
    if layout == "flat":
        files = {"question.jsonl": questions, "reference_answer_gpt-4.jsonl": refs,
                 "judge_prompts.jsonl": JUDGE_PROMPTS}
        where = folder
    elif layout == "fastchat":
        files = {"mt_bench/question.jsonl": questions, "mt_bench/reference_answer/gpt-4.jsonl": refs,
                 "judge_prompts.jsonl": JUDGE_PROMPTS}
        where = folder / "mt_bench"
    else:
        raise ValueError(f"layout: {layout!r} is not 'flat' or 'fastchat'")
    for rel, rows in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_jsonl(rows), encoding="utf-8")
    return where


def natural_texts() -> tuple[list[dict], list[str]]:
    """(questions with their two answers, longer documents: the extra texts, then standard-library docs)."""
    questions = [{"question_id": q, "category": c, "turns": list(t), "answers": list(a)}
                 for q, c, t, a in QUESTIONS]
    docs = set()
    for name in _DOC_MODULES:
        mod = importlib.import_module(name)
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 300:
                docs.add(doc)
    return questions, list(EXTRA_TEXTS) + sorted(docs)


def natural_conversations(n: int, *, chars: int = 2400) -> list[list[dict]]:
    """``n`` ShareGPT conversations of about ``chars`` characters each, deterministic: the
    questions' two turns with their answers, then follow-ups answered with documents."""
    questions, docs = natural_texts()
    out = []
    d = 0
    for i in range(n):
        q = questions[i % len(questions)]
        turns: list[dict] = []
        size = 0
        t = 0
        while size < chars:
            ask = q["turns"][t] if t < 2 else "Tell me more."
            if t < 2:
                ans = q["answers"][t]
            else:
                ans = docs[d % len(docs)]
                d += 1
            turns += [{"from": "human", "value": ask}, {"from": "gpt", "value": ans}]
            size += len(ask) + len(ans)
            t += 1
        out.append(turns)
    return out
