#!/usr/bin/env python3
"""Expected token ids for the ds4-tokenizer corpus tests.

Generates a deterministic multi-lingual / multi-format corpus (code, English, Italian, CJK, emoji,
whitespace and digit runs, mixed scripts, DS4 special tokens inside text, rendered chat transcripts
with DSML tool calls), appends the official-vector prompts and (development corpus only) excerpts of real source files
and READMEs (see SOURCES: permissive licences only), long whitespace/digit runs, extra Italian and
CJK prose, and DS4 special tokens spliced into real text; then tokenizes every document with the
HF `tokenizers` Python library (the reference), writing:

  <out>/<name>.jsonl          one JSON object per document: {"cat": category, "text": text}
  <out>/<name>.ids            binary, unsigned LEB128 varints: per document the token count, then
                              the ids (HF semantics: Tokenizer.encode(text, add_special_tokens=False).ids)
  <out>/<name>.plain.ids      per selected document (see PLAIN_CATS): varint document index, then
                              count and ids with no added-token recognition (pre-tokenizer + BPE only)
  <out>/<name>.ds4chat.ids    same layout as .plain.ids: only the 7 ds4 specials recognised
  <out>/fixture_docs.json     for files under the shared fixtures folder (long-context prompts, not
                              copied into the repository): path and byte length; their ids follow
                              in <out>/fixture_docs.ids (same layout as <name>.ids, in order)

Usage:
  python3 scripts/tokenizer_fixtures.py                       # development corpus (seed 1)
  python3 scripts/tokenizer_fixtures.py --heldout             # held-out corpus (seed 7777, smaller)

The development corpus reads the files listed in SOURCES from a Python 3.11.7 installation
(--python-root, default /root/.pyenv/versions/3.11.7) and from the cargo registry
(--cargo-src, default ~/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f); crate versions
are part of the paths, so the text is fixed. Total size: about 1.27 MB (the Rust test requires
at least 1,000,000 bytes).

Paths default to this repository layout; see --help.
"""

import argparse
import json
import os
import random
import sys
import unicodedata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_FIXTURES = os.path.join(os.path.dirname(REPO), "shared", "fixtures")
DEFAULT_OUT = os.path.join(REPO, "crates", "ds4-tokenizer", "tests", "data")

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
DS4_SPECIALS = [BOS, EOS, USER, ASSISTANT, THINK, THINK_END, DSML]

# Documents for which the .plain.ids / .ds4chat.ids variants are stored: all of these categories,
# and every 4th document of the sampled ones (to keep the repository small).
PLAIN_CATS = {"specials", "specials_src"}
PLAIN_SAMPLED_CATS = {"chat", "mixed"}

MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

# --------------------------------------------------------------------------------------------
# Seed material (written for this corpus).
# --------------------------------------------------------------------------------------------

CODE_SNIPPETS = [
    # Rust
    '''use std::collections::HashMap;

/// Counts words in `text`, case-insensitively.
pub fn word_counts(text: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for word in text.split_whitespace() {
        let w = word.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase();
        if w.is_empty() { continue; }
        *counts.entry(w).or_insert(0usize) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts() {
        let c = super::word_counts("a A b; b, B!");
        assert_eq!(c["a"], 2);
        assert_eq!(c["b"], 3);
    }
}
''',
    '''impl<T: Ord + Copy> Heap<T> {
    fn sift_down(&mut self, mut i: usize) {
        let n = self.v.len();
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut m = i;
            if l < n && self.v[l] < self.v[m] { m = l; }
            if r < n && self.v[r] < self.v[m] { m = r; }
            if m == i { break; }
            self.v.swap(i, m);
            i = m;
        }
    }
}
''',
    # Python
    '''import json, math
from dataclasses import dataclass, field

@dataclass
class Stats:
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    samples: list = field(default_factory=list)

    def push(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0

if __name__ == "__main__":
    s = Stats()
    for v in [1.5, 2.25, 3.125, 1e-3, -7]:
        s.push(v)
    print(json.dumps({"mean": s.mean, "std": s.std}, indent=2))
''',
    '''def parse_args(argv=None):
    p = argparse.ArgumentParser(description="resize images")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("paths", nargs="+")
    return p.parse_args(argv)

async def fetch_all(session, urls):
    tasks = [asyncio.create_task(fetch(session, u)) for u in urls]
    return await asyncio.gather(*tasks, return_exceptions=True)
''',
    # C
    '''#include <stdio.h>
#include <stdint.h>
#include <string.h>

static uint32_t fnv1a(const char *s, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 16777619u;
    }
    return h;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        printf("%08x  %s\\n", fnv1a(argv[i], strlen(argv[i])), argv[i]);
    }
    return argc > 1 ? 0 : 1;
}
''',
    '''typedef struct node { int key; struct node *left, *right; } node;

node *insert(node *t, int key) {
    if (!t) { t = calloc(1, sizeof(*t)); t->key = key; return t; }
    if (key < t->key) t->left = insert(t->left, key);
    else if (key > t->key) t->right = insert(t->right, key);
    return t;
}
#define MAX(a,b) ((a)>(b)?(a):(b))
int height(const node *t) { return t ? 1 + MAX(height(t->left), height(t->right)) : 0; }
''',
    # JavaScript / TypeScript
    '''export async function loadUsers(api: string, page = 1): Promise<User[]> {
  const res = await fetch(`${api}/users?page=${page}&per_page=50`, {
    headers: { "Accept": "application/json", "X-Client": "corpus/1.0" },
  });
  if (!res.ok) throw new Error(`HTTP ${res.status}: ${res.statusText}`);
  const body = (await res.json()) as { data: User[]; next?: number };
  return body.next ? [...body.data, ...(await loadUsers(api, body.next))] : body.data;
}

const debounce = (fn, ms = 250) => { let t; return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); }; };
''',
    # Go
    '''package main

import (
	"fmt"
	"sort"
	"strings"
)

type byLen []string

func (s byLen) Len() int           { return len(s) }
func (s byLen) Less(i, j int) bool { return len(s[i]) < len(s[j]) }
func (s byLen) Swap(i, j int)      { s[i], s[j] = s[j], s[i] }

func main() {
	words := strings.Fields("the quick brown fox jumps over the lazy dog")
	sort.Stable(byLen(words))
	fmt.Println(strings.Join(words, ","), len(words))
}
''',
    # Java
    '''public final class Matrix {
    private final double[][] a;
    public Matrix(int rows, int cols) { this.a = new double[rows][cols]; }
    public Matrix times(Matrix b) {
        Matrix c = new Matrix(a.length, b.a[0].length);
        for (int i = 0; i < a.length; i++)
            for (int k = 0; k < b.a.length; k++)
                for (int j = 0; j < b.a[0].length; j++)
                    c.a[i][j] += a[i][k] * b.a[k][j];
        return c;
    }
    @Override public String toString() { return java.util.Arrays.deepToString(a); }
}
''',
    # SQL
    '''SELECT c.id, c.name, COUNT(o.id) AS orders, SUM(o.total_cents) / 100.0 AS revenue
FROM customers AS c
LEFT JOIN orders AS o ON o.customer_id = c.id AND o.created_at >= DATE '2024-01-01'
WHERE c.country IN ('IT', 'FR', 'DE') AND c.deleted_at IS NULL
GROUP BY c.id, c.name
HAVING COUNT(o.id) > 3
ORDER BY revenue DESC NULLS LAST
LIMIT 25 OFFSET 50;
''',
    # Shell
    '''#!/usr/bin/env bash
set -euo pipefail
for f in "$@"; do
  if [[ -f "$f" ]]; then
    sz=$(stat -c %s "$f")
    printf '%-40s %10d bytes\\n' "$f" "$sz"
  else
    echo "missing: $f" >&2; exit 2
  fi
done | sort -k2 -n | tail -n 20
find . -name '*.tmp' -mtime +7 -print0 | xargs -0 rm -f -- 2>/dev/null || true
''',
    # HTML / CSS
    '''<!DOCTYPE html>
<html lang="it">
<head>
  <meta charset="utf-8">
  <title>Prova &amp; verifica</title>
  <style>
    body { font: 16px/1.5 system-ui, sans-serif; margin: 0 auto; max-width: 42rem; }
    .card > h2::after { content: " \\2192"; color: #c0392b; }
    @media (max-width: 600px) { body { padding: 0 1em; } }
  </style>
</head>
<body>
  <div class="card" data-id="42"><h2>Titolo</h2><p>Un paragrafo con <em>enfasi</em> &lt;tag&gt;.</p></div>
  <script>document.querySelectorAll(".card").forEach(c => c.addEventListener("click", () => alert(c.dataset.id)));</script>
</body>
</html>
''',
    # JSON / YAML / TOML
    '''{
  "name": "corpus-tool",
  "version": "0.3.1",
  "scripts": {"build": "tsc -p .", "test": "vitest run --coverage"},
  "dependencies": {"zod": "^3.22.4", "undici": "~6.6.2"},
  "matrix": [[1, 2, 3], [4.5, -6e-7, null], [true, false, "x\\u00e9y"]]
}
''',
    '''services:
  api:
    image: registry.example.com/api:1.14.2
    ports: ["8080:8080", "9090:9090"]
    environment:
      - DATABASE_URL=postgres://user:pa$$w0rd@db:5432/app?sslmode=disable
      - RUST_LOG=info,tower_http=debug
    deploy: { replicas: 3, resources: { limits: { cpus: "0.50", memory: 512M } } }
[package]
name = "demo"
edition = "2021"
[dependencies]
serde = { version = "1", features = ["derive"] }
''',
    # Makefile, Lisp, Haskell, asm, regex, diff
    '''CFLAGS ?= -O2 -Wall -Wextra -std=c11
OBJS := $(patsubst %.c,%.o,$(wildcard src/*.c))
all: app
app: $(OBJS)
\t$(CC) $(CFLAGS) -o $@ $^ -lm
%.o: %.c
\t$(CC) $(CFLAGS) -c -o $@ $<
.PHONY: clean
clean:
\trm -f $(OBJS) app
''',
    '''(defun fib (n)
  (if (< n 2) n (+ (fib (- n 1)) (fib (- n 2)))))
(mapcar #'fib '(0 1 2 3 4 5 6 7 8 9 10))
quicksort :: Ord a => [a] -> [a]
quicksort [] = []
quicksort (p:xs) = quicksort [x | x <- xs, x < p] ++ [p] ++ quicksort [x | x <- xs, x >= p]
main = print . sum . takeWhile (< 4000000) . filter even $ fibs where fibs = 1 : 2 : zipWith (+) fibs (tail fibs)
''',
    '''    .globl  sum_array
sum_array:
    xor     %eax, %eax
    test    %esi, %esi
    jle     .Ldone
.Lloop:
    add     (%rdi), %eax
    add     $4, %rdi
    dec     %esi
    jnz     .Lloop
.Ldone:
    ret
^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*)@(?:[a-z0-9-]+\\.)+[a-z]{2,}$
--- a/src/lib.rs
+++ b/src/lib.rs
@@ -10,7 +10,8 @@ fn main() {
-    let x = 1;
+    let x = 2;
+    let y = x << 3 >> 1;
''',
]

EN_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, and nobody noticed until the invoices arrived.",
    "Please remember to back up your files before upgrading the operating system.",
    "In 1969, two astronauts walked on the Moon while millions watched on television.",
    "The committee will reconvene on Thursday at 3:30 p.m. to discuss the budget.",
    "She said, \"I don't think that's what they meant,\" and closed the laptop.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Can you explain why the results differ between the two experiments?",
    "Our new policy (effective immediately) requires two-factor authentication.",
    "The museum's collection includes over 12,000 artifacts from ancient Mesopotamia.",
    "If the temperature drops below -5°C, the pipes may freeze overnight.",
    "He couldn't decide whether to take the early train or wait for the bus.",
    "Version 2.3.1 fixes a memory leak that occurred under heavy load.",
    "What's the difference between a compiler and an interpreter?",
    "The recipe calls for 250 g of flour, 3 eggs, and a pinch of salt.",
    "Rain is expected throughout the weekend; bring an umbrella!",
    "According to the report, emissions fell by 7.4% year-over-year.",
    "The algorithm runs in O(n log n) time and uses O(n) extra space.",
    "They met at a conference in Lisbon and have collaborated ever since.",
    "Don't forget: the deadline is Friday, 5 p.m. Eastern Time.",
    "The library closes early on holidays, so plan accordingly.",
    "Most birds migrate south in autumn, guided by the Earth's magnetic field.",
    "I'd rather be reading — or, honestly, sleeping — than sitting in traffic.",
    "A well-designed API makes the common case easy and the rare case possible.",
    "Mr. O'Brien's 3rd-floor office overlooks the harbor.",
    "The password must contain at least 12 characters, including a digit.",
    "Exactly how many people attended remains unclear…",
    "The U.S.A. and the E.U. signed the agreement on 2023-11-07.",
    "Tabs versus spaces: a debate older than most programmers.",
    "Let x = 3; then x² + 2x + 1 = 16.",
]

IT_SENTENCES = [
    "Perché il cielo è blu? Perché la luce si diffonde nell'atmosfera.",
    "La città di Firenze è famosa per l'arte rinascimentale e la cucina toscana.",
    "Domani pioverà, quindi è meglio portare l'ombrello.",
    "Il treno per Milano parte alle 7:45 dal binario 12.",
    "Ho comprato tre chili di pomodori, un po' di basilico e dell'olio extravergine.",
    "L'università ha pubblicato i risultati dell'esame di ammissione.",
    "«Non è così semplice», disse il professore, sorridendo.",
    "Qual è la differenza tra un'aquila e un falco?",
    "Più tardi andremo al mare, se non fa troppo freddo.",
    "Gli studenti hanno già consegnato le tesi; ora attendono la discussione.",
    "La Divina Commedia di Dante Alighieri è divisa in tre cantiche.",
    "Un caffè, per favore: ristretto e senza zucchero.",
    "Nel 1861 venne proclamato il Regno d'Italia.",
    "Il prezzo è di 19,99 € IVA inclusa, spedizione gratuita sopra i 50 €.",
    "Però non capisco perché tu debba partire così presto.",
    "Quest'anno la vendemmia è cominciata a fine agosto.",
    "È vero che a Venezia ci sono più ponti che strade?",
    "La nonna preparava le tagliatelle a mano ogni domenica.",
    "Sarà difficile, ma ce la faremo: l'importante è non arrendersi.",
    "Il documento è disponibile in formato PDF (2,3 MB).",
    "Cosa ne pensi dell'ultimo romanzo di quell'autore?",
    "Le Alpi separano l'Italia dalla Francia, dalla Svizzera e dall'Austria.",
    "Attenzione: il ponte è chiuso per lavori fino al 30 settembre.",
    "Vorrei prenotare un tavolo per quattro persone alle otto.",
    "Ciò che conta è la qualità, non la quantità.",
]

ZH_SENTENCES = [
    "今天天气很好，我们去公园散步吧。",
    "人工智能正在改变我们的生活和工作方式。",
    "这本书一共有三百二十页，我已经读完了一半。",
    "请问去火车站怎么走？",
    "他说：“明天的会议推迟到下午三点。”",
    "学习一门新的编程语言需要时间和耐心。",
    "长城是世界上最长的人造建筑之一。",
    "我们在2024年3月15日签订了合同。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "数据库查询速度提高了百分之四十。",
    "如果你有任何问题，请随时联系我们。",
    "这个函数的时间复杂度是多少？",
    "北京、上海、广州和深圳是中国的一线城市。",
    "她喜欢喝绿茶，不喜欢喝咖啡。",
    "《红楼梦》是中国古典四大名著之一。",
]

JA_SENTENCES = [
    "今日はとても良い天気ですね。",
    "東京駅から新幹線で大阪まで約二時間半かかります。",
    "このプログラムはメモリを効率的に使用します。",
    "すみません、トイレはどこですか？",
    "日本の四季はそれぞれ美しいです。",
    "カタカナで書くと「コンピューター」になります。",
    "彼女は毎朝コーヒーを飲みながら新聞を読みます。",
    "ﾊﾝｶｸｶﾀｶﾅもたまに使われます。",
    "吾輩は猫である。名前はまだ無い。",
    "会議は午後３時から始まります。",
    "ひらがな、カタカナ、漢字を組み合わせて書きます。",
    "ありがとうございました！またお越しください。",
]

KO_SENTENCES = [
    "안녕하세요, 만나서 반갑습니다.",
    "오늘 저녁에 뭐 먹을까요?",
    "서울은 대한민국의 수도입니다.",
    "이 소프트웨어는 오픈 소스입니다.",
    "한글은 세종대왕이 만들었습니다.",
    "내일 오전 10시에 회의가 있습니다.",
]

OTHER_SCRIPT_SENTENCES = [
    "Привет, как дела? Сегодня хорошая погода.",
    "Москва — столица России; население около 13 млн человек.",
    "Ελληνικά: Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο.",
    "مرحبا بالعالم! كيف حالك اليوم؟",
    "اَلْعَرَبِيَّةُ لُغَةٌ جَمِيلَةٌ",
    "שלום עולם, מה שלומך?",
    "בְּרֵאשִׁית בָּרָא אֱלֹהִים",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "हिन्दी भारत की राजभाषा है।",
    "สวัสดีครับ ยินดีที่ได้รู้จัก",
    "வணக்கம் உலகம்",
    "გამარჯობა მსოფლიო",
    "Բարեւ աշխարհ",
    "Türkçe: Çalışkan öğrenciler ödevlerini zamanında teslim eder.",
    "Polski: Zażółć gęślą jaźń.",
    "Čeština: Příliš žluťoučký kůň úpěl ďábelské ódy.",
    "Tiếng Việt: Xin chào, tôi là một trợ lý.",
    "Deutsch: Größere Straßen führen über die Brücke.",
    "Français : « Où est la bibliothèque ? » demanda-t-elle.",
    "Español: ¿Dónde está la estación? ¡Qué bien!",
    "Português: Não sei se ela já chegou à estação.",
    "Íslenska: Þetta er ævintýri.",
    "ქართული ენა",
    "Ṫḧë q̈üïċk ḃṙöẅṅ ḟöẍ",
]

EMOJI = [
    "😀", "😂", "🥲", "😍", "🤔", "🙃", "😴", "🤯", "🥳", "😎", "👍", "👍🏽", "👎🏿", "👋🏻",
    "🙏", "💪🏾", "🫶", "👨‍👩‍👧‍👦", "👩‍💻", "🧑🏽‍🚀", "🏳️‍🌈", "🏴‍☠️", "❤️", "💔", "🔥", "✨",
    "🎉", "🚀", "🌍", "🌧️", "⚡", "☕", "🍕", "🍣", "🐍", "🦀", "🐧", "🐳", "🇮🇹", "🇯🇵",
    "🇺🇸", "🇪🇺", "1️⃣", "#️⃣", "©️", "™️", "✔️", "❌", "⚠️", "🔒", "📦", "🧪", "🧵", "🪐",
    "🫠", "🥹", "🧑‍🤝‍🧑", "👁️‍🗨️", "☺", "♥", "✌", "⭐", "🌟", "💯", "🆗", "🅰️", "🈚",
]

UNICODE_MISC = [
    "\u00a0", "\u2009", "\u200b", "\u200d", "\u3000", "\ufeff", "\u202f", "\u2028",
    "e\u0301", "n\u0303", "a\u030a", "Z\u0351\u0352\u0353\u0354", "ﬁ", "ﬀ", "Å", "Å",
    "∑", "∫", "√", "∞", "≠", "≤", "≥", "±", "×", "÷", "∂", "∇", "∈", "∀", "∃",
    "€", "£", "¥", "₹", "₿", "¢", "§", "¶", "†", "‡", "•", "…", "‰", "′", "″",
    "←", "→", "↑", "↓", "⇒", "⇔", "─", "│", "┌", "┐", "└", "┘", "█", "░",
    "²", "³", "¹", "½", "¼", "¾", "Ⅻ", "ⅻ", "①", "②", "⑩", "１２３", "ＡＢＣ", "ａｂｃ",
    "٣٤٥", "۱۲۳", "०१२", "๑๒๓", "𝐀𝐁𝐂", "𝟘𝟙𝟚", "𠀀", "𠜎", "𝄞", "𓂀",
    "“quoted”", "‘single’", "„low“", "«guillemets»", "‹›", "—", "–", "‐", "‑",
    "・", "〜", "「」", "『』", "【】", "、", "。", "！", "？", "（）", "：", "；",
    "\t", "\u000b", "\u000c", "\r", "\u0085",
]

WORDS_EN = ("time year people way day man thing woman life child world school state family "
            "student group country problem hand part place case week company system program "
            "question work government number night point home water room mother area money "
            "story fact month lot right study book eye job word business issue side kind head "
            "house service friend father power hour game line end member law car city community "
            "name president team minute idea kid body information back parent face others level "
            "office door health person art war history party result change morning reason "
            "research girl guy moment air teacher force education").split()

WORDS_IT = ("casa tempo anno giorno uomo donna vita mondo scuola stato famiglia studente gruppo "
            "paese problema mano parte luogo caso settimana azienda sistema programma domanda "
            "lavoro governo numero notte punto acqua stanza madre zona denaro storia fatto mese "
            "libro occhio parola città perché però più già così è età virtù caffè tè "
            "società libertà verità università qualità").split()

FIRST_NAMES = ["Alice", "Bob", "Chiara", "Dmitri", "Elena", "Farid", "Giulia", "Hiroshi", "Ines",
               "João", "Kwame", "Lukas", "Marta", "Nguyễn", "Oksana", "Pietro", "Zoë", "Søren"]

TOOLS = [
    {"type": "function", "function": {"name": "read_file", "description": "Read a UTF-8 text file.",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"},
                    "start_line": {"type": "integer"}, "end_line": {"type": "integer"}},
                    "required": ["path"]}}},
    {"type": "function", "function": {"name": "run_shell", "description": "Run a shell command & capture output",
     "parameters": {"type": "object", "properties": {"command": {"type": "string"},
                    "timeout_s": {"type": "number"}}, "required": ["command"]}}},
    {"type": "function", "function": {"name": "get_weather", "description": "Meteo per città",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                    "days": {"type": "integer", "minimum": 1, "maximum": 10},
                    "units": {"type": "string", "enum": ["metric", "imperial"]}}}}},
    {"type": "function", "function": {"name": "search", "description": "Web search <beta>",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"},
                    "filters": {"type": "object"}, "top_k": {"type": "integer"}}}}},
]

TOOLS_HEADER = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user question. "
    "You can invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n"
    "<｜DSML｜tool_calls>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME\">\n"
    "<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\n"
    "String parameters should be specified as raw text and set `string=\"true\"`. "
    "Preserve characters such as `>`, `&`, and `&&` exactly; never replace normal string characters "
    "with XML or HTML entity escapes. "
    "Only if a string value itself contains the exact closing parameter tag `</｜DSML｜parameter>`, "
    "write that tag as `&lt;/｜DSML｜parameter>` inside the value. "
    "For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set "
    "`string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning "
    "inside <think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
TOOLS_FOOTER = ("\n\nYou MUST strictly follow the above defined tool name and parameter schemas to "
                "invoke tool calls. Use the exact parameter names from the schemas.")


# --------------------------------------------------------------------------------------------
# Generators.
# --------------------------------------------------------------------------------------------

def assigned_chars(ranges):
    out = []
    for lo, hi in ranges:
        for cp in range(lo, hi + 1):
            c = chr(cp)
            if 0xD800 <= cp <= 0xDFFF:
                continue
            if unicodedata.category(c) in ("Cn", "Cs", "Co"):
                continue
            out.append(c)
    return out


RANDOM_POOL_RANGES = [
    (0x20, 0x7E), (0xA0, 0x24F), (0x250, 0x2FF), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF),
    (0x530, 0x58F), (0x590, 0x5FF), (0x600, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F),
    (0x10A0, 0x10FF), (0x1100, 0x11FF), (0x1E00, 0x1EFF), (0x2000, 0x206F), (0x2070, 0x209F),
    (0x20A0, 0x20CF), (0x2100, 0x214F), (0x2150, 0x218F), (0x2190, 0x21FF), (0x2200, 0x22FF),
    (0x2460, 0x24FF), (0x2500, 0x257F), (0x25A0, 0x25FF), (0x2600, 0x26FF), (0x2700, 0x27BF),
    (0x3000, 0x303F), (0x3040, 0x309F), (0x30A0, 0x30FF), (0x3400, 0x34FF), (0x4E00, 0x4FFF),
    (0x9F00, 0x9FFF), (0xAC00, 0xACFF), (0xFB00, 0xFB4F), (0xFE30, 0xFE4F), (0xFF00, 0xFFEF),
    (0x1D400, 0x1D4FF), (0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F900, 0x1F9FF),
    (0x20000, 0x200FF),
]


class Gen:
    def __init__(self, seed, added_tokens):
        self.r = random.Random(seed)
        self.added = added_tokens
        self.pool = assigned_chars(RANDOM_POOL_RANGES)

    def pick(self, xs):
        return xs[self.r.randrange(len(xs))]

    def ws(self):
        r = self.r
        return self.pick([" ", " ", " ", "  ", "\n", "\n\n", "\t", " \n", "\r\n", "   ", "\n  ",
                          " " * r.randint(2, 40), "\t" * r.randint(1, 6), "\n" * r.randint(2, 8)])

    def number(self):
        r = self.r
        k = r.randrange(12)
        if k == 0:
            return str(r.randint(0, 9))
        if k == 1:
            return str(r.randint(10, 99999))
        if k == 2:
            return "".join(r.choice("0123456789") for _ in range(r.randint(5, 80)))
        if k == 3:
            return f"{r.uniform(-1e6, 1e6):.{r.randint(0, 8)}f}"
        if k == 4:
            return f"{r.randint(0, 10**9):,}"
        if k == 5:
            return f"0x{r.randrange(1 << 32):08X}"
        if k == 6:
            return f"{r.randint(1900, 2100)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"
        if k == 7:
            return ".".join(str(r.randint(0, 255)) for _ in range(4))
        if k == 8:
            return f"+39 {r.randint(300, 399)} {r.randint(100, 999)} {r.randint(1000, 9999)}"
        if k == 9:
            return f"{r.uniform(0, 1e4):.2e}"
        if k == 10:
            return f"{r.randint(1, 999)}.{r.randint(0, 999):03d}.{r.randint(0, 999):03d},{r.randint(0, 99):02d}"
        return str(r.randint(-10**12, 10**12))

    # --- categories ---

    def code(self):
        r = self.r
        s = self.pick(CODE_SNIPPETS)
        k = r.randrange(6)
        if k == 1:
            s = s.replace("    ", "\t")
        elif k == 2:
            s = s.replace("    ", "  ")
        elif k == 3:
            s = s.replace("\n", "\r\n")
        elif k == 4:
            ind = " " * r.choice([2, 4, 8, 12])
            s = "".join(ind + line for line in s.splitlines(True))
        elif k == 5:
            # rename some identifiers and numbers
            for old in ["counts", "self", "node", "words", "res", "key", "fn", "i", "x"]:
                if r.random() < 0.3:
                    s = s.replace(old, old + "_" + str(r.randint(0, 99)))
        if r.random() < 0.3:
            s = s[: r.randrange(len(s) + 1)]
        if r.random() < 0.2:
            s = s + self.pick(CODE_SNIPPETS)[: r.randint(0, 400)]
        return s

    def prose(self, sentences, words):
        r = self.r
        out = []
        for _ in range(r.randint(2, 12)):
            if r.random() < 0.8:
                out.append(self.pick(sentences))
            else:
                n = r.randint(3, 15)
                w = [self.pick(words) for _ in range(n)]
                if r.random() < 0.3:
                    w.insert(r.randrange(len(w) + 1), self.number())
                if r.random() < 0.3:
                    w.insert(r.randrange(len(w) + 1), self.pick(FIRST_NAMES))
                sent = " ".join(w)
                out.append(sent[0].upper() + sent[1:] + self.pick([".", "!", "?", ";", ":", "...", ""]))
            out.append(self.pick([" ", " ", " ", "\n", "\n\n", "  "]))
        s = "".join(out)
        if r.random() < 0.15:
            s = s.upper()
        elif r.random() < 0.1:
            s = s.lower()
        return s

    def cjk(self):
        r = self.r
        out = []
        for _ in range(r.randint(2, 10)):
            k = r.randrange(10)
            if k < 4:
                out.append(self.pick(ZH_SENTENCES))
            elif k < 7:
                out.append(self.pick(JA_SENTENCES))
            elif k < 8:
                out.append(self.pick(KO_SENTENCES))
            elif k < 9:
                out.append(self.pick(EN_SENTENCES))
            else:
                out.append(self.number())
            out.append(self.pick(["", "", " ", "\n", "　", "。", " "]))
        return "".join(out)

    def emoji(self):
        r = self.r
        out = []
        for _ in range(r.randint(5, 40)):
            k = r.randrange(6)
            if k < 3:
                out.append(self.pick(EMOJI))
            elif k == 3:
                out.append(self.pick(WORDS_EN))
            elif k == 4:
                out.append(self.pick(EMOJI) * r.randint(2, 5))
            else:
                out.append(self.pick(ZH_SENTENCES + IT_SENTENCES)[: r.randint(1, 20)])
            out.append(self.pick(["", " ", " ", "\n", "  "]))
        return "".join(out)

    def ws_digits(self):
        r = self.r
        out = []
        for _ in range(r.randint(5, 30)):
            k = r.randrange(7)
            if k == 0:
                out.append(self.ws())
            elif k == 1:
                out.append("".join(r.choice(" \t\n\r\u000b\u000c") for _ in range(r.randint(1, 60))))
            elif k == 2:
                out.append(self.number())
            elif k == 3:
                out.append(self.pick(WORDS_EN + WORDS_IT))
            elif k == 4:
                out.append(self.pick(["(", ")", "{", "}", ";", ",", ".", ":", "=", "==", "->", "//", "#",
                                      "!", "?", "''", '"', "`", "$", "%", "&&", "||", "<", ">", "</", "/>"]))
            elif k == 5:
                out.append(" " * r.randint(1, 300))
            else:
                out.append("\n" * r.randint(1, 5) + " " * r.randint(0, 16))
        return "".join(out)

    def mixed(self):
        r = self.r
        out = []
        for _ in range(r.randint(4, 30)):
            k = r.randrange(9)
            if k == 0:
                out.append(self.pick(OTHER_SCRIPT_SENTENCES))
            elif k == 1:
                out.append(self.pick(UNICODE_MISC))
            elif k == 2:
                out.append("".join(self.pick(self.pool) for _ in range(r.randint(1, 30))))
            elif k == 3:
                out.append(self.pick(WORDS_EN) + self.pick(UNICODE_MISC) + self.pick(WORDS_IT))
            elif k == 4:
                out.append(self.pick(ZH_SENTENCES)[:3] + self.pick(WORDS_EN))
            elif k == 5:
                out.append(self.pick(EMOJI) + self.pick(OTHER_SCRIPT_SENTENCES)[:8])
            elif k == 6:
                out.append(self.number() + self.pick(UNICODE_MISC))
            elif k == 7:
                out.append(self.ws())
            else:
                out.append(self.pick(IT_SENTENCES + EN_SENTENCES))
            out.append(self.pick(["", " ", " ", "\n"]))
        return "".join(out)

    def specials(self):
        r = self.r
        broken = ["<｜User", "｜DSML", "<think", "</think ", "<｜begin▁of▁sentence｜", "｜", "<|User|>",
                  "<｜Assistant", "</｜DSML｜", "<｜DSML｜", "<｜DSML｜tool_calls>", "</ think>",
                  "<｜end▁of▁sentence", "▁", "<｜", "｜>", "<<｜User｜>>", "<think>>"]
        out = []
        for _ in range(r.randint(3, 25)):
            k = r.randrange(8)
            if k < 3:
                out.append(self.pick(DS4_SPECIALS))
            elif k == 3:
                out.append(self.pick(self.added))
            elif k == 4:
                out.append(self.pick(broken))
            elif k == 5:
                out.append(self.pick(EN_SENTENCES + IT_SENTENCES + ZH_SENTENCES))
            elif k == 6:
                out.append(self.ws())
            else:
                out.append(self.pick(DS4_SPECIALS) + self.pick(DS4_SPECIALS))
            if r.random() < 0.4:
                out.append(self.pick([" ", "\n", "", "x", "1", "。", "😀"]))
        return "".join(out)

    def random_text(self):
        r = self.r
        n = r.randint(1, 200)
        return "".join(self.pick(self.pool) if r.random() < 0.7 else self.pick(" \n\t0123456789abc<>/｜")
                       for _ in range(n))

    # --- chat transcripts (ds4 server rendering) ---

    def dsml_value(self):
        r = self.r
        k = r.randrange(7)
        if k == 0:
            return True, self.pick(["/tmp/x.txt", "src/main.rs", "C:\\Users\\me\\a b.txt", "~/notes.md"])
        if k == 1:
            return True, self.code()[: r.randint(0, 300)]
        if k == 2:
            return True, self.pick(IT_SENTENCES + EN_SENTENCES + ZH_SENTENCES)
        if k == 3:
            return False, str(r.randint(-5, 5000))
        if k == 4:
            return False, self.pick(["true", "false", "null", "[1,2,3]", '{"a":1,"b":[true,null]}', "3.25"])
        if k == 5:
            return True, "ls -la && grep -R 'x > 1' . | wc -l & echo </｜DSML｜parameter> done"
        return True, self.pick(EMOJI) + " " + self.number()

    def dsml_block(self):
        r = self.r
        out = ["\n\n<｜DSML｜tool_calls>\n"]
        for _ in range(r.randint(1, 3)):
            tool = self.pick(TOOLS)["function"]
            out.append(f'<｜DSML｜invoke name="{tool["name"]}">\n')
            for pname in list(tool["parameters"]["properties"].keys())[: r.randint(1, 3)]:
                is_str, val = self.dsml_value()
                if is_str:
                    val = val.replace("</｜DSML｜parameter>", "&lt;/｜DSML｜parameter>")
                out.append(f'<｜DSML｜parameter name="{pname}" string="{"true" if is_str else "false"}">'
                           f"{val}</｜DSML｜parameter>\n")
            out.append("</｜DSML｜invoke>\n")
        out.append("</｜DSML｜tool_calls>")
        return "".join(out)

    def chat(self):
        r = self.r
        think = r.random() < 0.6
        tools = r.random() < 0.5
        out = [BOS]
        if think and r.random() < 0.1:
            out.append(MAX_PREFIX)
        system = []
        if tools:
            lines = [json.dumps(t["function"], ensure_ascii=False, separators=(",", ":") if r.random() < 0.5 else (", ", ": "))
                     for t in r.sample(TOOLS, r.randint(1, len(TOOLS)))]
            system.append(TOOLS_HEADER + "\n".join(lines) + TOOLS_FOOTER)
        if r.random() < 0.7:
            system.append(self.pick(["You are a helpful assistant", "Sei un assistente utile. Rispondi in italiano.",
                                     "你是一个乐于助人的助手。", "Answer concisely.\nUse Markdown."]))
        out.append("\n\n".join(system))
        turns = r.randint(1, 5)
        for t in range(turns):
            out.append(USER)
            out.append(self.prose(EN_SENTENCES + IT_SENTENCES, WORDS_EN)[: r.randint(10, 400)])
            last = t == turns - 1
            if last and r.random() < 0.5:
                break
            out.append(ASSISTANT)
            if think:
                out.append(THINK + self.prose(EN_SENTENCES, WORDS_EN)[: r.randint(0, 300)] + THINK_END)
            else:
                out.append(THINK_END)
            out.append(self.prose(EN_SENTENCES + IT_SENTENCES + ZH_SENTENCES, WORDS_IT)[: r.randint(0, 300)])
            if tools and r.random() < 0.6:
                out.append(self.dsml_block())
                out.append(EOS)
                out.append(USER)
                for _ in range(r.randint(1, 3)):
                    res = self.pick([self.code()[:300], self.ws_digits()[:200], "ok", "",
                                     "error: no such file </tool_result> x", self.mixed()[:200]])
                    out.append("<tool_result>" + res.replace("</tool_result>", "&lt;/tool_result>") + "</tool_result>")
                out.append(ASSISTANT + (THINK if think else THINK_END))
                if r.random() < 0.5:
                    out.append(self.prose(EN_SENTENCES, WORDS_EN)[:200] + (THINK_END if think else "") + "Done." + EOS)
            else:
                out.append(EOS)
        if out[-1] != EOS or r.random() < 0.5:
            out.append(ASSISTANT + (THINK if think else THINK_END))
        return "".join(out)

    def doc(self):
        cats = [("code", 20), ("en", 8), ("it", 7), ("cjk", 7), ("emoji", 4), ("wsdigits", 6),
                ("mixed", 9), ("specials", 8), ("chat", 14), ("random", 4)]
        total = sum(w for _, w in cats)
        x = self.r.randrange(total)
        for cat, w in cats:
            if x < w:
                break
            x -= w
        if cat == "code":
            return cat, self.code()
        if cat == "en":
            return cat, self.prose(EN_SENTENCES, WORDS_EN)
        if cat == "it":
            return cat, self.prose(IT_SENTENCES, WORDS_IT)
        if cat == "cjk":
            return cat, self.cjk()
        if cat == "emoji":
            return cat, self.emoji()
        if cat == "wsdigits":
            return cat, self.ws_digits()
        if cat == "mixed":
            return cat, self.mixed()
        if cat == "specials":
            return cat, self.specials()
        if cat == "chat":
            return cat, self.chat()
        return cat, self.random_text()


# --------------------------------------------------------------------------------------------
# Extra material for the development corpus (issue 2: a >= 1 MB corpus). Appended after the
# generated documents and the official prompts, with its own random stream, so the documents
# generated from the seed (and the held-out corpus) are unchanged.
# --------------------------------------------------------------------------------------------

# Real source files and READMEs, by licence (all permissive):
#   python: CPython 3.11.7 standard library and C headers, PSF License Version 2
#           (<python-root>/lib/python3.11/LICENSE.txt).
#   cargo:  crates from crates.io, licence as declared in each crate's Cargo.toml:
#           itoa 1.0.19, fnv 1.0.7, heck 0.5.0, semver 1.0.28, anyhow 1.0.105,
#           thiserror 2.0.21, rayon 1.12.0, serde 1.0.229, half 2.7.1,
#           unicode-segmentation 1.13.3, regex 1.13.2: MIT OR Apache-2.0;
#           strsim 0.11.1, tokio 1.54.1, libm 0.2.16: MIT; memchr 2.8.3: Unlicense OR MIT.
# (root, relative path, category, byte cap: the file's first `cap` bytes, cut at a line end)
SOURCES = [
    ("python", "lib/python3.11/textwrap.py", "code_src", 12000),
    ("python", "lib/python3.11/heapq.py", "code_src", 23100),
    ("python", "lib/python3.11/shlex.py", "code_src", 13600),
    ("python", "lib/python3.11/colorsys.py", "code_src", 4100),
    ("python", "lib/python3.11/string.py", "code_src", 11800),
    ("python", "lib/python3.11/graphlib.py", "code_src", 9700),
    ("python", "lib/python3.11/csv.py", "code_src", 16100),
    ("python", "lib/python3.11/json/decoder.py", "code_src", 12500),
    ("python", "lib/python3.11/json/encoder.py", "code_src", 16100),
    ("python", "lib/python3.11/bisect.py", "code_src", 3200),
    ("python", "include/python3.11/object.h", "code_src", 30000),
    ("python", "include/python3.11/pymacro.h", "code_src", 6100),
    ("python", "include/python3.11/longobject.h", "code_src", 3300),
    ("cargo", "itoa-1.0.19/src/lib.rs", "code_src", 17400),
    ("cargo", "fnv-1.0.7/lib.rs", "code_src", 19200),
    ("cargo", "strsim-0.11.1/src/lib.rs", "code_src", 12000),
    ("cargo", "semver-1.0.28/src/parse.rs", "code_src", 12200),
    ("cargo", "heck-0.5.0/src/lib.rs", "code_src", 6500),
    ("cargo", "libm-0.2.16/src/math/pow.rs", "code_src", 12000),
    ("cargo", "libm-0.2.16/src/math/exp2.rs", "code_src", 16600),
    ("cargo", "memchr-2.8.3/README.md", "en_src", 9900),
    ("cargo", "regex-1.13.2/README.md", "en_src", 12300),
    ("cargo", "tokio-1.54.1/README.md", "en_src", 9600),
    ("cargo", "anyhow-1.0.105/README.md", "en_src", 6100),
    ("cargo", "thiserror-2.0.21/README.md", "en_src", 7500),
    ("cargo", "rayon-1.12.0/README.md", "en_src", 5800),
    ("cargo", "serde-1.0.229/README.md", "en_src", 4400),
    ("cargo", "half-2.7.1/README.md", "en_src", 5600),
    ("cargo", "unicode-segmentation-1.13.3/README.md", "en_src", 5700),
]

# Written for this corpus.
IT_EXTRA = [
    "Il sistema operativo è stato aggiornato ieri sera; purtroppo alcune applicazioni non partono più.",
    "Nella bottega dell'artigiano, tra trucioli e colla, nascevano violini che avrebbero girato il mondo.",
    "Secondo l'ISTAT, nel terzo trimestre la disoccupazione è scesa al 7,4%, il valore più basso dal 2008.",
    "«Hai già letto il capitolo sulla ricorsione?» «Sì, ma l'esempio delle torri di Hanoi non mi è chiaro.»",
    "Perciò, se il file non esiste, la funzione restituisce un errore invece di andare in crisi.",
    "La ricetta della nonna: 500 g di farina 00, 5 uova, un pizzico di sale e tanta pazienza.",
    "Gl'italiani d'altri tempi scrivevano «perchè» con l'accento grave; oggi si scrive «perché».",
    "Sull'autostrada A1, tra Firenze e Bologna, c'è coda per 12 km a causa di un incidente.",
    "Chi va piano va sano e va lontano, ma chi va forte arriva prima — diceva mio zio ridendo.",
    "Il modello linguistico genera un token alla volta, scegliendo il più probabile o campionando.",
    "Abbiamo misurato la latenza: 38 ms in media, con picchi di 120 ms nelle ore di punta.",
    "L'àncora, l'ancóra: due parole che si distinguono soltanto per l'accento.",
    "Ecco perché è fondamentale scrivere test che possano davvero fallire.",
    "Qualcuno ha lasciato la finestra aperta e adesso nell'ufficio fa un freddo cane!",
    "Lunedì 3 marzo, alle ore 9.30, si terrà l'assemblea ordinaria dei soci presso la sede di Torino.",
    "Né l'uno né l'altro: la soluzione giusta sta nel mezzo, come spesso accade.",
    "ATTENZIONE: NON UTILIZZARE L'ASCENSORE IN CASO DI INCENDIO.",
    "La velocità della luce nel vuoto è di circa 299.792,458 km/s.",
]

CJK_EXTRA = [
    "深度学习模型通常需要大量的训练数据和计算资源，而推理阶段则更关注延迟和吞吐量。",
    "分词器把文本切分成子词单元，每个单元对应词表中的一个编号。",
    "我昨天晚上十一点半才下班，今天早上七点又得起床，真的太累了！",
    "请在下方输入您的用户名和密码，然后点击“登录”按钮。",
    "文件大小为３．５ＭＢ，下载大约需要十秒钟。",
    "量子计算机利用叠加和纠缠来处理某些特定问题。",
    "このライブラリはRustで書かれており、メモリ安全性が保証されています。",
    "雨が降りそうなので、傘を持って行ったほうがいいですよ。",
    "第３章では、トークナイザーの仕組みについて詳しく説明します。",
    "桜の花が満開になると、多くの人がお花見に出かけます。",
    "컴퓨터 과학에서 알고리즘은 문제를 해결하기 위한 절차입니다.",
    "주말에는 친구들과 함께 한강 공원에서 자전거를 탔어요.",
    "繁體中文：臺灣的夜市以各式各樣的小吃聞名。",
    "粤语：你食咗飯未呀？我哋一齊去飲茶啦。",
]


def read_sources(python_root, cargo_src):
    roots = {"python": python_root, "cargo": cargo_src}
    out = []
    for root, rel, cat, cap in SOURCES:
        path = os.path.join(roots[root], rel)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if len(text.encode("utf-8")) > cap:
            cut = text.encode("utf-8")[:cap].decode("utf-8", errors="ignore")
            text = cut[: cut.rfind("\n") + 1]
        out.append((cat, rel, text))
    return out


class ExtraGen:
    def __init__(self, seed, gen, sources):
        self.r = random.Random(seed)
        self.g = gen  # for numbers/whitespace helpers (its stream is no longer used for documents)
        self.g.r = self.r
        self.sources = sources

    def pick(self, xs):
        return xs[self.r.randrange(len(xs))]

    def source_docs(self):
        """Each source file split at line ends into documents of 1-8 KB (a few transformed)."""
        r = self.r
        docs = []
        for cat, _, text in self.sources:
            lines = text.splitlines(True)
            i = 0
            while i < len(lines):
                want = r.randint(1000, 8000)
                j, n = i, 0
                while j < len(lines) and n < want:
                    n += len(lines[j].encode("utf-8"))
                    j += 1
                chunk = "".join(lines[i:j])
                i = j
                k = r.randrange(10)
                if k == 0:
                    chunk = chunk.replace("\n", "\r\n")
                elif k == 1 and cat == "code_src":
                    chunk = chunk.replace("    ", "\t")
                docs.append((cat, chunk))
        return docs

    def long_runs(self):
        r = self.r
        out = []
        for _ in range(r.randint(3, 12)):
            k = r.randrange(9)
            if k == 0:
                out.append(" " * r.randint(100, 4000))
            elif k == 1:
                out.append("\t" * r.randint(20, 500))
            elif k == 2:
                out.append("\n" * r.randint(20, 600))
            elif k == 3:
                out.append("".join(r.choice(" \t\n\r\u3000\u00a0") for _ in range(r.randint(50, 1500))))
            elif k == 4:
                out.append("".join(r.choice("0123456789") for _ in range(r.randint(100, 3000))))
            elif k == 5:
                out.append(self.pick(["0", "9", "1", "00", "12"]) * r.randint(50, 800))
            elif k == 6:
                sep = self.pick([",", ".", " ", "", "_", "-", "\n", "١", "٫"])
                out.append(sep.join(str(r.randint(0, 10**r.randint(1, 12))) for _ in range(r.randint(20, 300))))
            elif k == 7:
                out.append("".join(self.pick(["٠١٢٣٤٥٦٧٨٩", "０１２３４５６７８９", "०१२३४५६७८९", "²³¹", "ⅠⅡⅢ"])
                                   for _ in range(r.randint(5, 100))))
            else:
                out.append(self.pick(WORDS_EN + WORDS_IT) + " " * r.randint(1, 80) + self.g.number())
            out.append(self.pick(["", " ", "\n", "x", "。", "😀"]))
        return "".join(out)

    def it_long(self):
        r = self.r
        out = []
        for _ in range(r.randint(4, 20)):
            out.append(self.pick(IT_EXTRA) if r.random() < 0.7 else self.pick(IT_SENTENCES))
            out.append(self.pick([" ", " ", "\n", "\n\n", "  "]))
        s = "".join(out)
        return s.upper() if r.random() < 0.1 else s

    def cjk_long(self):
        r = self.r
        out = []
        for _ in range(r.randint(4, 20)):
            k = r.randrange(10)
            if k < 6:
                out.append(self.pick(CJK_EXTRA))
            elif k < 8:
                out.append(self.pick(ZH_SENTENCES + JA_SENTENCES + KO_SENTENCES))
            elif k < 9:
                out.append(self.pick(EMOJI) * r.randint(1, 4))
            else:
                out.append(self.g.number())
            out.append(self.pick(["", "", "\n", "　", " "]))
        return "".join(out)

    def emoji_long(self):
        r = self.r
        out = []
        for _ in range(r.randint(20, 120)):
            k = r.randrange(5)
            if k < 3:
                out.append(self.pick(EMOJI))
            elif k == 3:
                out.append(self.pick(WORDS_EN + WORDS_IT))
            else:
                out.append(self.pick(CJK_EXTRA + IT_EXTRA)[: r.randint(1, 12)])
            out.append(self.pick(["", " ", " ", "\n", "\u200d", "\ufe0f"]))
        return "".join(out)

    def specials_src(self):
        """An excerpt of a real source/README with DS4 specials (and other added tokens, and
        broken fragments of them) spliced in at random character positions."""
        r = self.r
        _, _, text = self.pick(self.sources)
        start = r.randrange(max(1, len(text) - 3000))
        s = text[start:start + r.randint(300, 3000)]
        broken = ["<｜User", "｜DSML", "<think", "</think ", "｜", "<|Assistant|>", "</｜DSML｜"]
        for _ in range(r.randint(3, 12)):
            p = r.randrange(len(s) + 1)
            k = r.randrange(6)
            if k < 3:
                ins = self.pick(DS4_SPECIALS)
            elif k == 3:
                ins = self.pick(self.g.added)
            elif k == 4:
                ins = self.pick(broken)
            else:
                ins = self.pick(DS4_SPECIALS) + self.pick(["", " ", "\n", "x"]) + self.pick(DS4_SPECIALS)
            s = s[:p] + ins + s[p:]
        return s

    def docs(self):
        r = self.r
        docs = self.source_docs()
        makers = [("wsdigits_long", self.long_runs, 45_000), ("it", self.it_long, 50_000),
                  ("cjk", self.cjk_long, 45_000), ("emoji", self.emoji_long, 25_000),
                  ("specials_src", self.specials_src, 45_000)]
        for cat, f, budget in makers:
            n = 0
            while n < budget:
                t = f()
                n += len(t.encode("utf-8"))
                docs.append((cat, t))
        # Interleave deterministically so categories are mixed in the file.
        r.shuffle(docs)
        return docs


# --------------------------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------------------------

def varint(n):
    """Unsigned LEB128."""
    if n < 0:
        raise ValueError(n)
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pack_ids(ids):
    return varint(len(ids)) + b"".join(varint(i) for i in ids)


def plain_ids(tok, text):
    ids = []
    for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text):
        ids.extend(t.id for t in tok.model.tokenize(piece))
    return ids


def ds4chat_ids(tok, text, special_ids):
    ids = []
    i = 0
    seg = 0
    while i < len(text):
        hit = None
        for s in DS4_SPECIALS:
            if text.startswith(s, i):
                hit = s
                break
        if hit:
            ids.extend(plain_ids(tok, text[seg:i]))
            ids.append(special_ids[hit])
            i += len(hit)
            seg = i
        else:
            i += 1
    ids.extend(plain_ids(tok, text[seg:]))
    return ids


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default=DEFAULT_FIXTURES, help="shared fixtures folder")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: <fixtures>/tokenizer/tokenizer.json)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--heldout", action="store_true", help="write the held-out corpus instead")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--bytes", type=int, default=None, help="approximate generated text size")
    ap.add_argument("--python-root", default="/root/.pyenv/versions/3.11.7",
                    help="CPython 3.11.7 installation (SOURCES, development corpus only)")
    ap.add_argument("--cargo-src", default=os.path.expanduser(
        "~/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f"),
                    help="cargo registry source folder (SOURCES, development corpus only)")
    args = ap.parse_args()

    from tokenizers import Tokenizer

    tok_path = args.tokenizer or os.path.join(args.fixtures, "tokenizer", "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    with open(tok_path, encoding="utf-8") as f:
        tj = json.load(f)
    added = [a["content"] for a in tj["added_tokens"]]
    special_ids = {s: tok.token_to_id(s) for s in DS4_SPECIALS}

    name = "heldout" if args.heldout else "corpus"
    seed = args.seed if args.seed is not None else (7777 if args.heldout else 1)
    target = args.bytes if args.bytes is not None else (150_000 if args.heldout else 700_000)
    g = Gen(seed, added)

    docs = []
    size = 0
    while size < target:
        cat, text = g.doc()
        docs.append((cat, text))
        size += len(text.encode("utf-8"))
    if not args.heldout:
        # The official-vector prompts, rendered as the official API saw them; the raw prompts are
        # copied to <out>/official_prompts/ for the prompt-token-count test.
        pdir = os.path.join(args.fixtures, "official-vectors", "prompts")
        os.makedirs(os.path.join(args.out, "official_prompts"), exist_ok=True)
        for fn in sorted(os.listdir(pdir)):
            with open(os.path.join(pdir, fn), "rb") as f:
                raw = f.read()
            with open(os.path.join(args.out, "official_prompts", fn), "wb") as f:
                f.write(raw)
            p = raw.decode("utf-8")
            docs.append(("official_rendered", f"{BOS}{USER}{p}{ASSISTANT}{THINK_END}"))
        docs.extend(ExtraGen(seed + 1_000_003, g, read_sources(args.python_root, args.cargo_src)).docs())

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for cat, text in docs:
            f.write(json.dumps({"cat": cat, "text": text}, ensure_ascii=False) + "\n")
    n_tokens = 0
    with open(os.path.join(args.out, f"{name}.ids"), "wb") as f:
        for _, text in docs:
            ids = tok.encode(text, add_special_tokens=False).ids
            n_tokens += len(ids)
            f.write(pack_ids(ids))
    with open(os.path.join(args.out, f"{name}.plain.ids"), "wb") as fp, \
            open(os.path.join(args.out, f"{name}.ds4chat.ids"), "wb") as fc:
        for i, (cat, text) in enumerate(docs):
            if cat in PLAIN_CATS or (cat in PLAIN_SAMPLED_CATS and i % 4 == 0):
                fp.write(varint(i) + pack_ids(plain_ids(tok, text)))
                fc.write(varint(i) + pack_ids(ds4chat_ids(tok, text, special_ids)))
    total = sum(len(t.encode("utf-8")) for _, t in docs)
    print(f"{name}: {len(docs)} documents, {total} bytes, {n_tokens} tokens", file=sys.stderr)

    if not args.heldout:
        entries = []
        ldir = os.path.join(args.fixtures, "long-context")
        for fn in sorted(os.listdir(ldir)):
            with open(os.path.join(ldir, fn), "rb") as f:
                raw = f.read()
            text = raw.decode("utf-8")
            entries.append(({"path": f"long-context/{fn}", "bytes": len(raw)},
                            tok.encode(text, add_special_tokens=False).ids))
        with open(os.path.join(args.out, "fixture_docs.json"), "w", encoding="utf-8") as f:
            json.dump([e for e, _ in entries], f, indent=1)
            f.write("\n")
        with open(os.path.join(args.out, "fixture_docs.ids"), "wb") as f:
            for _, ids in entries:
                f.write(pack_ids(ids))
        print(f"fixture docs: {[(e['path'], len(ids)) for e, ids in entries]}", file=sys.stderr)


if __name__ == "__main__":
    main()
