/// A rule-based English sentence splitter, the stand-in for NLTK's Punkt (`nltk.sent_tokenize`) that SummaC
/// splits documents and summaries with. Punkt learns abbreviations and sentence starters from a corpus; these
/// rules write the common cases down instead, so the two agree on ordinary news text and differ on rare ones.
///
/// The rules, in order:
/// 1. A line break always ends a sentence (data sets here keep one sentence per line, or mark breaks with a
///    marker that `moe score --newline-marker` turns into a line break); blank lines are dropped.
/// 2. Inside a line, a sentence can end only at a run of terminators (`.`, `!`, `?`, `…`), followed by any closing
///    quotes or brackets (which stay with the sentence), followed by white space or the end of the line. So a
///    decimal point (`3.14`, `$2.5bn`), a dotted name (`example.com`) or `U.S.-based` never ends one.
/// 3. It does not end there when the next word starts with a lower-case letter (`"Why?" she asked`, `etc. and`).
/// 4. A single `.` after a title or fixed abbreviation (`Mr.`, `Dr.`, `St.`, `Jan.`, `e.g.`, `i.e.`, `vs.`, `U.S.`,
///    any dotted acronym such as `U.N.`) or after a one-letter initial (`J. K. Rowling`) does not end it;
///    `No.` before a number (`No. 5`) does not either.
/// 5. A single `.` after an abbreviation that often ends sentences (`etc.`, `Inc.`, `Ltd.`, `Co.`, `Corp.`, `Jr.`,
///    `Sr.`, `a.m.`, `p.m.`) ends one only before a word that starts with a capital letter or a digit; rule 3 covers
///    the lower-case case.
/// Sentences are the text's own characters (trimmed), in order, so they cover every non-space character once.
module Moe.Sentences

open System
open System.Collections.Generic

/// Words that are followed by a name or number, never by a new sentence (compared lower-case, without the final
/// period). Dotted acronyms (`u.s`, `u.n`) are recognised by shape as well.
let titles : Set<string> =
    set [ "mr"; "mrs"; "ms"; "dr"; "prof"; "st"; "gen"; "sen"; "rep"; "gov"; "pres"; "capt"; "lt"; "col"; "sgt"
          "cmdr"; "adm"; "rev"; "hon"; "mt"; "ft"; "messrs"; "vs"; "v"; "fig"; "figs"; "eq"; "vol"; "pp"; "cf"; "approx"
          "dept"; "univ"; "ave"; "blvd"; "rd"; "jan"; "feb"; "mar"; "apr"; "jun"; "jul"; "aug"; "sep"; "sept"; "oct"
          "nov"; "dec"; "e.g"; "i.e"; "u.s"; "u.k"; "u.n"; "d.c" ]

/// Abbreviations that may end a sentence: a break is kept only before a capitalised word or a digit.
let terminalAbbreviations : Set<string> =
    set [ "etc"; "inc"; "ltd"; "co"; "corp"; "jr"; "llc"; "plc"; "a.m"; "p.m"; "al" ]

let private terminators = set [ '.'; '!'; '?'; '…' ]
let private closers = set [ '"'; '\''; '”'; '’'; ')'; ']'; '}'; '»' ]
let private openers = set [ '"'; '\''; '“'; '‘'; '('; '['; '{'; '«' ]

/// True for `u.s`, `e.g`, `a.m`: single letters joined by periods.
let private isDottedAcronym (word: string) =
    word.Length >= 3 && word.Contains '.' && word.Split('.') |> Array.forall (fun p -> p.Length = 1 && Char.IsLetter p[0])

/// Whether a sentence ends after `word` (the token before a single final period, without it) given the first
/// character of the next word.
let private periodEnds (word: string) (next: char) =
    let w = word.TrimStart(Seq.toArray openers).ToLowerInvariant()
    let capitalOrDigit = Char.IsUpper next || Char.IsDigit next || openers.Contains next
    if terminalAbbreviations.Contains w then capitalOrDigit
    elif titles.Contains w || isDottedAcronym w then false
    elif w.Length = 1 && Char.IsLetter w[0] && Char.IsUpper(word.TrimStart(Seq.toArray openers)[0]) then false
    elif (w = "no" || w = "nos") && Char.IsDigit next then false
    else true

/// The sentences of one line as (start, length) spans of `text`, trimmed, starting at `offset`.
let private lineSpans (text: string) (offset: int) (stop: int) : (int * int) list =
    let spans = List<int * int>()
    let mutable start = offset
    let add (a: int) (b: int) =
        let mutable a = a
        let mutable b = b
        while a < b && Char.IsWhiteSpace text[a] do a <- a + 1
        while b > a && Char.IsWhiteSpace text[b - 1] do b <- b - 1
        if b > a then spans.Add((a, b - a))
    let mutable i = offset
    while i < stop do
        if terminators.Contains text[i] then
            let runStart = i
            while i < stop && terminators.Contains text[i] do i <- i + 1
            let runEnd = i
            while i < stop && closers.Contains text[i] do i <- i + 1
            let sentenceEnd = i
            if i >= stop then ()
            elif Char.IsWhiteSpace text[i] then
                let mutable j = i
                while j < stop && Char.IsWhiteSpace text[j] do j <- j + 1
                if j < stop then
                    let next = text[j]
                    let ends =
                        if Char.IsLower next then false
                        elif runEnd - runStart = 1 && text[runStart] = '.' then
                            let mutable k = runStart
                            while k > start && not (Char.IsWhiteSpace text[k - 1]) do k <- k - 1
                            periodEnds (text.Substring(k, runStart - k)) next
                        else true
                    if ends then
                        add start sentenceEnd
                        start <- j
                i <- j
        else i <- i + 1
    add start stop
    List.ofSeq spans

/// The sentences of `text` as (start, length) spans, in order (rules in the module comment).
let spans (text: string) : (int * int)[] =
    if isNull text then invalidArg "text" "expected a text, got null"
    [| let mutable lineStart = 0
       for i in 0 .. text.Length do
           if i = text.Length || text[i] = '\n' then
               yield! lineSpans text lineStart i
               lineStart <- i + 1 |]

/// The sentences of `text`, trimmed, in order (rules in the module comment).
let split (text: string) : string[] =
    spans text |> Array.map (fun (s, n) -> text.Substring(s, n))
