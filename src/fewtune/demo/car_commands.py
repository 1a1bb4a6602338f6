"""The demo data set: Chinese in-car voice commands parsed to JSON.

Each example is one utterance such as 上车的时候自动播放QQ音乐 and its parse
``{"conditions": ["上车"], "actions": ["播放QQ音乐"]}``. Utterances are composed from
lexicons of conditions, actions (verb + object, so that 打开车窗和空调 can share one
verb) and connecting words, so the set is varied but every target is known exactly.

Run ``python -m fewtune.demo.car_commands OUT_DIR`` to write it again; the files in
``data/demo/`` were made that way with the default seed.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SYSTEM_PROMPT = "Parse the car voice command into JSON with conditions and actions."

CONDITIONS = [
    "上车", "下车", "启动车辆", "熄火", "下雨", "天黑", "到家", "到公司", "进入隧道",
    "车速超过八十", "电量低于百分之二十", "油量不足", "车内温度高于三十度", "车内温度低于十度",
    "早上八点", "晚上十点", "连上蓝牙", "倒车", "停车", "上高速", "下高速", "开车超过两小时",
    "有来电", "车门没关", "检测到疲劳驾驶", "空气质量变差",
]

# (verb, object): an action is verb+object; several objects may share one verb.
ACTIONS = {
    "打开": ["车窗", "空调", "天窗", "座椅加热", "雨刷", "大灯", "雾灯", "氛围灯", "香氛", "后备箱", "内循环", "座椅通风"],
    "关闭": ["车窗", "空调", "天窗", "座椅加热", "雨刷", "大灯", "雾灯", "氛围灯", "香氛", "内循环", "座椅通风", "屏幕"],
    "播放": ["QQ音乐", "网易云音乐", "酷狗音乐", "新闻", "相声", "有声书", "儿歌", "收藏的歌单"],
    "导航到": ["公司", "家", "机场", "最近的加油站", "最近的充电站", "火车站", "地下停车场"],
    "打电话给": ["妈妈", "老婆", "老公", "张经理", "王师傅", "客服"],
    "调高": ["音量", "空调温度", "风量", "屏幕亮度"],
    "调低": ["音量", "空调温度", "风量", "屏幕亮度"],
}
SET_TEMPERATURE = "空调调到{n}度"

COND_PATTERNS = [
    "{c}的时候", "当{c}时", "如果{c}", "{c}以后", "每次{c}", "{c}之后", "一旦{c}", "等{c}了",
]
ACTION_JOINERS = ["和", "并且", "然后", "，再", "，同时", "，顺便"]
COND_JOINERS = ["并且", "而且", "同时"]
PREFIXES = ["", "", "", "请", "帮我", "麻烦", "小助手，", "你好，"]
AUTO_WORDS = ["", "自动", "就", "就自动", "帮我"]
SUFFIXES = ["", "", "", "吧", "一下", "，谢谢"]


def _pick_actions(rng: random.Random, count: int) -> list[tuple[str, str]]:
    picked: list[tuple[str, str]] = []
    while len(picked) < count:
        if rng.random() < 0.08:
            action = ("", SET_TEMPERATURE.format(n=rng.randint(17, 28)))
        else:
            verb = rng.choice(list(ACTIONS))
            action = (verb, rng.choice(ACTIONS[verb]))
        # no two actions on the same object (打开车窗 and 关闭车窗 would contradict)
        if all(action[1] != other[1] for other in picked):
            picked.append(action)
    return picked


def _say_actions(rng: random.Random, actions: list[tuple[str, str]]) -> str:
    """Speak the actions, sharing a verb between neighbours (打开车窗和空调) half the time."""
    parts: list[str] = []
    i = 0
    while i < len(actions):
        verb, obj = actions[i]
        if verb and i + 1 < len(actions) and actions[i + 1][0] == verb and rng.random() < 0.7:
            parts.append(f"{verb}{obj}和{actions[i + 1][1]}")
            i += 2
            continue
        parts.append(f"{verb}{obj}")
        i += 1
    text = parts[0]
    for part in parts[1:]:
        text += rng.choice(ACTION_JOINERS) + part
    return text


def make_example(rng: random.Random) -> dict:
    n_conditions = rng.choices([0, 1, 2], weights=[4, 5, 1])[0]
    n_actions = rng.choices([1, 2, 3], weights=[5, 4, 1])[0]
    # share a verb more often than chance would, so contractions appear regularly
    actions = _pick_actions(rng, n_actions)
    if n_actions >= 2 and rng.random() < 0.35 and actions[0][0]:
        verb = actions[0][0]
        others = [o for o in ACTIONS[verb] if o != actions[0][1]]
        actions[1] = (verb, rng.choice(others))
    conditions = rng.sample(CONDITIONS, n_conditions)

    # 请/帮我 read oddly before a condition clause: those go before the actions instead
    said = rng.choice(PREFIXES[:3] + PREFIXES[6:]) if conditions else rng.choice(PREFIXES)
    if conditions:
        spoken = conditions[0]
        for cond in conditions[1:]:
            spoken += rng.choice(COND_JOINERS) + cond
        said += rng.choice(COND_PATTERNS).format(c=spoken) + rng.choice(["", "，"])
        said += rng.choice(AUTO_WORDS)
    said += _say_actions(rng, actions) + rng.choice(SUFFIXES)

    target: dict = {}
    if conditions:
        target["conditions"] = conditions
    target["actions"] = [verb + obj for verb, obj in actions]
    return {"prompt": said, "completion": json.dumps(target, ensure_ascii=False, separators=(",", ":"))}


def make_dataset(n_train: int = 300, n_test: int = 100, seed: int = 20261121) -> tuple[list[dict], list[dict]]:
    """Distinct utterances, split so that no test utterance occurs in training."""
    rng = random.Random(seed)
    seen: set[str] = set()
    examples: list[dict] = []
    while len(examples) < n_train + n_test:
        example = make_example(rng)
        if example["prompt"] not in seen:
            seen.add(example["prompt"])
            examples.append(example)
    return examples[:n_train], examples[n_train:]


def write_dataset(out_dir: str | Path, **kwargs) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = make_dataset(**kwargs)
    paths = (out / "car_commands_train.jsonl", out / "car_commands_test.jsonl")
    for path, rows in zip(paths, (train, test)):
        with open(path, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return paths


if __name__ == "__main__":
    for written in write_dataset(sys.argv[1] if len(sys.argv) > 1 else "data/demo"):
        print(written)
