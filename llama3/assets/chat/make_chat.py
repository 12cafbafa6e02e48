"""Write the bundled chat fine-tuning files from a small table of facts about Jane Austen's novels.

    python data/chat/make_chat.py        # rewrites austen_chat.jsonl and austen_dpo.jsonl beside this file

austen_chat.jsonl: short question-and-answer dialogs in OpenAI's `messages` format, answered in a courteous
Regency manner (some with a system prompt, some multi-turn, some calling a `lookup_character` tool in the
Llama 3.1 tool-call style). Opening sentences are taken from the bundled novels in data/austen/.
austen_dpo.jsonl: preference pairs whose chosen reply is correct and courteous and whose rejected reply is
curt, modern or wrong. The output is deterministic (fixed seed).
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
AUSTEN = HERE.parent / "austen"

NOVELS = {
    "Sense and Sensibility": dict(year=1811, file="sensesensibility.txt", heroine="Elinor and Marianne Dashwood",
                                  setting="Barton Cottage in Devonshire",
                                  summary="two sisters, one all prudence and the other all feeling, whose hearts "
                                          "are tried by Edward Ferrars and John Willoughby"),
    "Pride and Prejudice": dict(year=1813, file="prideprejudice.txt", heroine="Elizabeth Bennet",
                                setting="Longbourn in Hertfordshire",
                                summary="a lively young woman who must overcome her prejudice against the "
                                        "proud Mr. Darcy, as he must overcome his pride"),
    "Mansfield Park": dict(year=1814, file="mansfieldpark.txt", heroine="Fanny Price",
                           setting="Mansfield Park in Northamptonshire",
                           summary="a poor and timid cousin raised among the wealthy Bertrams, whose quiet "
                                   "principles outlast the charms of the Crawfords"),
    "Emma": dict(year=1815, file="emma.txt", heroine="Emma Woodhouse", setting="Highbury in Surrey",
                 summary="a handsome, clever and rich young woman whose matchmaking goes sadly astray "
                         "until she learns her own heart"),
    "Northanger Abbey": dict(year=1817, file="northangerabbey.txt", heroine="Catherine Morland",
                             setting="Bath and Northanger Abbey",
                             summary="an eager reader of Gothic romances who must learn to tell novels from "
                                     "life"),
    "Persuasion": dict(year=1817, file="persuasion.txt", heroine="Anne Elliot", setting="Kellynch, Lyme and Bath",
                       summary="a woman persuaded, eight years before, to refuse the man she loved, and "
                               "granted a second chance when Captain Wentworth returns"),
}

CHARACTERS = [
    ("Elizabeth Bennet", "Pride and Prejudice", "the second and wittiest of the five Bennet daughters"),
    ("Mr. Darcy", "Pride and Prejudice", "a proud and wealthy gentleman, master of Pemberley in Derbyshire"),
    ("Jane Bennet", "Pride and Prejudice", "the eldest Bennet daughter, gentle and ever ready to think well of others"),
    ("Mr. Bingley", "Pride and Prejudice", "an amiable young man of fortune who takes Netherfield Park"),
    ("Mr. Wickham", "Pride and Prejudice", "a charming officer whose agreeable manners hide a want of principle"),
    ("Mr. Collins", "Pride and Prejudice", "a pompous clergyman and the heir to the Longbourn estate"),
    ("Lady Catherine de Bourgh", "Pride and Prejudice", "Mr. Darcy's imperious aunt, of Rosings Park"),
    ("Mrs. Bennet", "Pride and Prejudice", "a mother whose business in life is to get her daughters married"),
    ("Mr. Bennet", "Pride and Prejudice", "a sardonic father who retreats to his library"),
    ("Lydia Bennet", "Pride and Prejudice", "the youngest Bennet sister, who elopes with Mr. Wickham"),
    ("Charlotte Lucas", "Pride and Prejudice", "Elizabeth's sensible friend, who marries Mr. Collins"),
    ("Emma Woodhouse", "Emma", "the handsome, clever and rich mistress of Hartfield"),
    ("Mr. Knightley", "Emma", "the sensible owner of Donwell Abbey and Emma's truest critic"),
    ("Harriet Smith", "Emma", "a sweet-tempered young friend whom Emma tries to match"),
    ("Frank Churchill", "Emma", "Mr. Weston's charming son, who keeps a secret engagement"),
    ("Jane Fairfax", "Emma", "an accomplished and reserved young woman, niece of Miss Bates"),
    ("Mr. Elton", "Emma", "the vicar of Highbury, who aims higher than Harriet"),
    ("Miss Bates", "Emma", "a kind and endlessly talkative spinster of Highbury"),
    ("Mr. Woodhouse", "Emma", "Emma's fretful father, much concerned with gruel and draughts"),
    ("Elinor Dashwood", "Sense and Sensibility", "the elder Dashwood sister, who governs her feelings with sense"),
    ("Marianne Dashwood", "Sense and Sensibility", "the younger Dashwood sister, all ardour and sensibility"),
    ("Edward Ferrars", "Sense and Sensibility", "a modest gentleman bound by an early engagement"),
    ("Colonel Brandon", "Sense and Sensibility", "a grave and honourable gentleman of Delaford"),
    ("John Willoughby", "Sense and Sensibility", "a dashing young man who wins and wounds Marianne's heart"),
    ("Lucy Steele", "Sense and Sensibility", "a sly young woman secretly engaged to Edward Ferrars"),
    ("Mrs. Jennings", "Sense and Sensibility", "a good-humoured widow fond of gossip and matchmaking"),
    ("Anne Elliot", "Persuasion", "the overlooked middle daughter of Sir Walter Elliot"),
    ("Captain Wentworth", "Persuasion", "a naval officer who returns from the war with a fortune"),
    ("Sir Walter Elliot", "Persuasion", "a vain baronet of Kellynch Hall who admires his own looks"),
    ("Louisa Musgrove", "Persuasion", "a spirited young woman who falls from the Cobb at Lyme"),
    ("Lady Russell", "Persuasion", "Anne's godmother, who once persuaded her to break her engagement"),
    ("Mr. William Elliot", "Persuasion", "Sir Walter's heir, polished and not to be trusted"),
    ("Fanny Price", "Mansfield Park", "a timid and steadfast niece raised at Mansfield Park"),
    ("Edmund Bertram", "Mansfield Park", "Fanny's kind cousin, who means to take orders"),
    ("Sir Thomas Bertram", "Mansfield Park", "the stern master of Mansfield Park"),
    ("Mary Crawford", "Mansfield Park", "a witty and worldly young woman from London"),
    ("Henry Crawford", "Mansfield Park", "Mary's brother, a charming and inconstant flirt"),
    ("Mrs. Norris", "Mansfield Park", "Fanny's officious and mean-spirited aunt"),
    ("Catherine Morland", "Northanger Abbey", "a young reader of Gothic novels on her first visit to Bath"),
    ("Henry Tilney", "Northanger Abbey", "a clever and teasing young clergyman"),
    ("General Tilney", "Northanger Abbey", "Henry's overbearing father, master of Northanger Abbey"),
    ("Isabella Thorpe", "Northanger Abbey", "Catherine's effusive and insincere friend"),
    ("John Thorpe", "Northanger Abbey", "Isabella's boastful brother, forever talking of his horses"),
    ("Eleanor Tilney", "Northanger Abbey", "Henry's gentle sister and Catherine's true friend"),
]

SYSTEMS = [
    "You are a courteous assistant who speaks in the manner of Jane Austen's narrators.",
    "You answer questions about Jane Austen's novels briefly and with perfect civility.",
]
GREETINGS = [
    ("Good morning.", "Good morning to you. I am entirely at your service; pray, what would you know of "
                      "Miss Austen's novels?"),
    ("Hello!", "How do you do? It would give me great pleasure to speak of Miss Austen's novels, if you wish it."),
    ("Who are you?", "I am a humble assistant, well read in the six novels of Jane Austen, and happy to be of use."),
    ("Thank you.", "You are very welcome. It has been a pleasure to be of service."),
    ("What can you do?", "I can tell you of Miss Austen's heroines, her gentlemen and her villains, and where and "
                         "when each novel was published."),
]
LOOKUP_TOOL = "lookup_character"


def opening_sentence(novel: str) -> str:
    """The first sentence after the first chapter heading of the bundled text."""
    text = (AUSTEN / NOVELS[novel]["file"]).read_text(encoding="utf-8")
    body = re.split(r"^chapter (?:1|i)\s*$", text, maxsplit=1, flags=re.IGNORECASE | re.MULTILINE)[1]
    paragraph = " ".join(body.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    return match.group(1) if match else paragraph


def character_turns(rng: random.Random, name: str, novel: str, desc: str) -> list[tuple[str, str]]:
    year = NOVELS[novel]["year"]
    return [
        (rng.choice([f"Who is {name}?", f"Tell me about {name}.", f"Pray, who is {name}?"]),
         f"{name} is {desc}, in {novel}."),
        (rng.choice([f"Which novel features {name}?", f"In which book does {name} appear?"]),
         f"{name} appears in {novel}, which Miss Austen published in {year}."),
    ]


def novel_turns(novel: str) -> list[tuple[str, str]]:
    info = NOVELS[novel]
    return [
        (f"Who wrote {novel}?", f"{novel} was written by Jane Austen and published in {info['year']}."),
        (f"Who is the heroine of {novel}?", f"The heroine of {novel} is {info['heroine']}."),
        (f"When was {novel} published?", f"{novel} was published in {info['year']}."),
        (f"What is {novel} about?", f"{novel} follows {info['heroine']}: {info['summary']}."),
        (f"Where is {novel} set?", f"{novel} is chiefly set at {info['setting']}."),
        (f"How does {novel} begin?", f"It begins thus: \u201c{opening_sentence(novel)}\u201d"),
    ]


def dialog(rng: random.Random, turns: list[tuple[str, str]]) -> dict:
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.5 else []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def tool_dialog(name: str, novel: str, desc: str) -> dict:
    call = {"id": "call_0", "type": "function",
            "function": {"name": LOOKUP_TOOL, "arguments": json.dumps({"name": name})}}
    result = {"name": name, "novel": novel, "description": desc}
    system = (f"You may call the function {LOOKUP_TOOL}(name) to look up a character of Jane Austen's novels; "
              "reply with a JSON call when you need it.")
    return {"messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Kindly look up {name} for me."},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": json.dumps(result)},
        {"role": "assistant", "content": f"I have found {name}: {desc}, in {novel}."},
    ]}


def chat_records(rng: random.Random) -> list[dict]:
    singles: list[tuple[str, str]] = []
    for name, novel, desc in CHARACTERS:
        singles += character_turns(rng, name, novel, desc)
    for novel in NOVELS:
        singles += novel_turns(novel)
    records = [dialog(rng, [turn]) for turn in singles]
    records += [dialog(rng, [turn]) for turn in GREETINGS]
    for _ in range(120):  # multi-turn dialogs: two or three questions in a row
        records.append(dialog(rng, rng.sample(singles, rng.choice([2, 3]))))
    records += [tool_dialog(*c) for c in rng.sample(CHARACTERS, 20)]
    rng.shuffle(records)
    return records


def preference_records(rng: random.Random) -> list[dict]:
    novels = list(NOVELS)
    records = []
    for name, novel, desc in CHARACTERS:
        wrong = rng.choice([n for n in novels if n != novel])
        curt = rng.choice(["idk, some book character.", f"{name}? no idea lol", "Look it up yourself."])
        records.append({"prompt": f"Who is {name}?", "chosen": f"{name} is {desc}, in {novel}.",
                        "rejected": curt})
        records.append({"prompt": [{"role": "system", "content": SYSTEMS[0]},
                                   {"role": "user", "content": f"Which novel features {name}?"}],
                        "chosen": f"{name} appears in {novel}, which Miss Austen published in "
                                  f"{NOVELS[novel]['year']}.",
                        "rejected": f"{name} appears in {wrong}."})
    rng.shuffle(records)
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    chat, prefs = chat_records(random.Random(0)), preference_records(random.Random(1))
    write_jsonl(HERE / "austen_chat.jsonl", chat)
    write_jsonl(HERE / "austen_dpo.jsonl", prefs)
    print(f"wrote {len(chat)} dialogs and {len(prefs)} preference pairs to {HERE}")


if __name__ == "__main__":
    main()
