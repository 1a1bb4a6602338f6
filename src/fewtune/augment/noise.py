"""Speech-style noise for inputs that come from speech recognition (the in-car commands are such input).

Three kinds, each applied to a candidate with its own chance (at least one always is):
- fillers: a colloquial filler (嗯, 那个, 就是, 呃 / um, uh, like) at the start or at a word boundary;
- repetition: one word said twice (我我想, "play play");
- homophones (Chinese): one character replaced by another with the same toneless pinyin, as a
  recogniser mishears it (播放 -> 拨放). Replacement characters are drawn from a fixed list of common
  characters grouped by pinyin (pypinyin, offline), so the result is deterministic. English has no
  homophone step (a useful one would need a pronunciation lexicon).
Protected spans are never touched, and nothing is inserted inside one.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from fewtune.augment.base import Candidate, augmentable_turns, with_turns
from fewtune.augment.options import NoiseOptions
from fewtune.augment.spans import split_protected

# about 700 frequent characters: where homophones are drawn from (a misheard character is a common one)
_COMMON_ZH = ("的一是不了在人有我他这个们中来上大为和国地到以说时要就出会可也你对生能而子那得于着下自之年过发后作里"
              "用道行所然家种事成方多经么去法学如都同现当没动面起看定天分还进好小部其些主样理心她本前开但因只从想实日"
              "军者意无力它与长把机十民第公此已工使情明性知全三又关点正业外将两高间由问很最重并物手应战向头文体政美相见"
              "被利什二等产或新己制身果加西斯月话合回特代内信表化老给世位次度门任常先海通教儿原东声提立及比员解水名真论"
              "处走义各入几口认条平系气题活尔更别打女变四神总何电数安少报才结反受目太量再感建务做接必场件计管期市直德资"
              "命山金指克许统区保至队形社便空决治展马科司五基眼书非则听白却界达光放强即像难且权思王象完设式色路记南品住"
              "告类求据程北边死张该交规万取拉格望觉术领共确传师观清今切院让识候带导争运笑飞风步改收根干造言联持组每济车"
              "亲极林服快办议往元英士证近失转夫令准布始怎呢存未远叫台单影具罗字爱击流备兵连调深商算质团集百需价花党华城"
              "石级整府离况亚请技际约示复病息究线似官火断精满支视消越器容照须九增研写称企八功吗包片史委乎查轻易早曾除农"
              "找装广显吧阿李标谈吃图念六引历首医局突专费号尽另周较注语仅考落青随选列武红响虽推势参希古众构房半节土投某"
              "案黑维革划敌致陈律足态护七兴派孩验责营星够章音跟志底站严巴例防族供效续施留讲型料终答紧黄绝奇察母京段依批"
              "群项故按河米围江织害斗双境客纪采举杀攻父苏密低朝友诉止细愿千值仍男钱破网热助倒育属坐帝限船脸职速刻乐否刚"
              "威毛状率甚独球般普怕弹校苦创假久错承印晚兰试股拿脑预谁益阳若哪微尼继送急血惊伤素药适波夜省初喜卫源食险待"
              "述陆习置居劳财环排福纳欢雷警获模充负云停木游龙树疑层冷洲冲射略范竟句室异激汉村哈策演简卡罪判担州静退既衣"
              "您宗积余痛检差富灵协角占配征修皮挥胜降阶审沉坚善妈刘读啊超免压银买皇养伊怀执副乱抗犯追帮宣佛岁航优怪香著"
              "田铁控税左右份穿艺背阵草脚概恶块顿敢守酒岛托央户烈洋哥索胡款靠评版宝座释景顾弟登货互付伯慢欧换闻危忙核暗"
              "姐介坏讨丽良序升监临亮露永呼味野架域沙掉括舰鱼杂误湾吉减编楚肯测败屋跑梦散温困剑渐封救贵枪缺楼县尚毫移娘"
              "朋画班智亦耳恩短掌恐遗固席松秘谢鲁遇康虑幸均销钟诗藏赶剧票损忽巨炮旧端探湖录叶春乡附吸予礼港雨呀板庭妇归"
              "睛饭额含顺输摇招婚脱补谓督毒油疗旅泽材灭逐莫笔亡鲜词圣择寻厂睡博勒烟授诺伦岸奥唐卖俄炸载洛健堂旁宫喝借君"
              "禁阴园谋宋避抓荣姑孙逃牙束跳顶玉镇雪午练迫爷篇肉嘴馆遍凡础洞卷坦牛宁纸诸训私庄祖丝翻暴森塔默握戏隐熟骨访"
              "弱蒙歌店鬼软典欲萨伙遭盘爸扩盖弄雄稳忘亿刺拥徒姆杨齐赛趣曲刀床迎冰虚玩析窗醒妻透购替塞努休虎扬途侵刑绿兄"
              "迅套贸毕唯谷轮库迹尤竞街促延震弃甲伟麻川申缓潜闪售灯针哲络抵朱埃抱鼓植纯夏忍页杰筑折郑贝尊吴秀混臣雅振染"
              "盛怒舞圆搞狂措姓残秋培迷诚宽宇猛摆梅毁伸摩盟末乃悲拍丁赵拔灰奴陷拨")


@lru_cache(maxsize=1)
def _by_sound() -> dict[str, list[str]]:
    from pypinyin import Style, lazy_pinyin

    groups: dict[str, list[str]] = {}
    for ch in dict.fromkeys(_COMMON_ZH):
        groups.setdefault(lazy_pinyin(ch, style=Style.NORMAL)[0], []).append(ch)
    return groups


def homophones(ch: str) -> list[str]:
    """Common characters read with the same toneless pinyin as ``ch`` (``ch`` excluded)."""
    from pypinyin import Style, lazy_pinyin

    sound = lazy_pinyin(ch, style=Style.NORMAL)[0]
    return [c for c in _by_sound().get(sound, []) if c != ch]


def _free(pieces: list[tuple[str, bool]]) -> list[int]:
    return [i for i, (p, locked) in enumerate(pieces) if not locked and p.strip()]


def _zh_words(piece: str) -> list[str]:
    from fewtune.quality.textstats import _segmenter

    return _segmenter().lcut(piece)


def noise_text(text: str, options: NoiseOptions, rng: random.Random, protected: list[str],
               zh: bool) -> tuple[str, list[str]]:
    """``text`` with speech-style noise, and the kinds applied."""
    kinds = [k for k, p in (("filler", options.p_filler), ("repeat", options.p_repeat),
                            ("homophone", options.p_homophone if zh else 0.0)) if rng.random() < p]
    if not kinds:
        kinds = [rng.choice(["filler", "repeat"] + (["homophone"] if zh else []))]
    # words of the unprotected pieces (English: whitespace kept as its own units, so the text between
    # words survives); protected spans stay one unit each
    units: list[tuple[str, bool]] = []
    for piece, locked in split_protected(text, protected):
        if locked:
            units.append((piece, True))
        elif zh:
            units += [(w, False) for w in _zh_words(piece)]
        else:
            units += [(w, False) for w in re.split(r"(\s+)", piece) if w]
    space = [] if zh else [(" ", False)]
    applied = []
    for kind in kinds:
        free = [i for i in _free(units) if any(ch.isalnum() for ch in units[i][0])]
        if kind == "filler":
            filler = rng.choice(options.fillers_zh if zh else options.fillers_en)
            # at a word boundary: before a word (English: one after whitespace), or at the end
            at = rng.choice([i for i, (u, _) in enumerate(units)
                             if u.strip() and (zh or i == 0 or not units[i - 1][0].strip())] + [len(units)])
            if at == len(units):
                units[at:] = space + [(filler, False)]
            elif zh:
                units[at:at] = [(filler + ("，" if at == 0 else ""), False)]
            else:
                said = filler
                if at == 0:  # "Um, please ..." rather than "um Please ..."
                    first = units[0][0]
                    said = filler[:1].upper() + filler[1:] + ","
                    if first[:1].isupper() and first[1:2].islower() and not units[0][1]:
                        units[0] = (first[:1].lower() + first[1:], False)
                units[at:at] = [(said, False)] + space
            applied.append(f"filler:{filler}")
        elif kind == "repeat" and (words := [i for i in free if zh or i == 0 or not units[i - 1][0].strip()]):
            i = rng.choice(words)
            said = units[i][0] if zh else re.sub(r"[^\w']+$", "", units[i][0])  # "lunch? lunch?": no, "lunch lunch?"
            units[i:i] = [(said, False)] + space
            applied.append(f"repeat:{said}")
        elif kind == "homophone":
            spots = [(i, j) for i in free for j, ch in enumerate(units[i][0]) if homophones(ch)]
            if spots:
                i, j = rng.choice(spots)
                word = units[i][0]
                new = rng.choice(homophones(word[j]))
                units[i] = (word[:j] + new + word[j + 1:], False)
                applied.append(f"homophone:{word[j]}->{new}")
    return "".join(u for u, _ in units), applied


def build_noise(options: NoiseOptions, resources):
    from fewtune.augment.eda import _is_zh

    language = resources.language or options.language

    def augment(example, n, rng, protected):
        out = []
        for _ in range(n):
            new, applied = {}, []
            for i in augmentable_turns(example):
                text = example.messages[i].content
                new[i], kinds = noise_text(text, options, rng, protected, _is_zh(text, language))
                applied += kinds
            out.append(Candidate(with_turns(example, new), {"noise": applied}))
        return out

    return augment
