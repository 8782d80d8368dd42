/// CoNLL-2003 column files (Tjong Kim Sang & De Meulder 2003): one token per line with space-separated
/// columns (`word POS chunk NER` in English), sentences separated by blank lines, documents opened by a
/// `-DOCSTART-` line. Reads the words and the NER column, in IOB1 (the original release: B- only between two
/// adjacent entities of one type) or IOB2 (B- at every entity's start), and hands out IOB2. Bad input raises
/// `DataException` naming the file and line.
/// Legend: L tokens in one sentence.
module Moe.Conll

open System
open System.Collections.Generic
open Moe.TextTools

// ---------------------------------------------------------------- tags and chunks

/// The conlleval outside tag.
let outside = "O"

/// A tag split as conlleval splits it: the prefix before the first '-' (B, I or O) and the entity type after it
/// ("" for O). Only O, B-TYPE and I-TYPE are accepted; anything else is an error naming the tag.
let splitTag (tag: string) : string * string =
    if isNull tag then invalidArg "tag" "expected a tag O, B-TYPE or I-TYPE, got null"
    if tag = outside then outside, ""
    else
        let dash = tag.IndexOf '-'
        let prefix = if dash > 0 then tag.Substring(0, dash) else ""
        if dash <= 0 || dash = tag.Length - 1 || (prefix <> "B" && prefix <> "I") then
            invalidArg "tag" (sprintf "expected a tag O, B-TYPE or I-TYPE, got '%s'" tag)
        prefix, tag.Substring(dash + 1)

/// An entity: its type and its first and last token (inclusive), 0-based within the sentence.
type Chunk = { Type: string; Start: int; End: int }

/// conlleval's endOfChunk for B/I/O tags: a chunk ends between the previous tag and this one.
let private endsChunk (prevTag: string) (tag: string) (prevType: string) (typ: string) =
    (prevTag = "B" && tag = "B") || (prevTag = "B" && tag = outside) || (prevTag = "I" && tag = "B")
    || (prevTag = "I" && tag = outside) || (prevTag <> outside && prevType <> typ)

/// conlleval's startOfChunk for B/I/O tags: a chunk starts at this tag.
let private startsChunk (prevTag: string) (tag: string) (prevType: string) (typ: string) =
    tag = "B" || (prevTag = outside && tag = "I") || (tag <> outside && prevType <> typ)

/// The entities of one sentence's tags, read with conlleval's rules: a chunk starts at B-X, at I-X after O and
/// at any tag whose type differs from the previous one, and ends before the next start or O. So IOB1 (B- only
/// between two adjacent entities of one type) and IOB2 (B- at every entity's start) give the same entities for
/// the same annotation. The sentence boundary closes an open chunk.
let chunks (tags: string[]) : Chunk[] =
    if isNull tags then invalidArg "tags" "expected a tag sequence, got null"
    let found = ResizeArray<Chunk>()
    let mutable prevTag, prevType = outside, ""
    let mutable start = -1
    for i in 0 .. tags.Length do
        let tag, typ = if i = tags.Length then outside, "" else splitTag tags[i]
        if start >= 0 && endsChunk prevTag tag prevType typ then
            found.Add { Type = prevType; Start = start; End = i - 1 }
            start <- -1
        if i < tags.Length && startsChunk prevTag tag prevType typ then start <- i
        prevTag <- tag
        prevType <- typ
    found.ToArray()

/// IOB1 tags rewritten as IOB2: an I-X that starts an entity (after O, after another type, or first in the
/// sentence) becomes B-X; everything else is unchanged. The entities (`chunks`) are the same before and after.
let iob1ToIob2 (tags: string[]) : string[] =
    let mutable prevType = ""
    [| for tag in tags ->
         let prefix, typ = splitTag tag
         let out = if prefix = "I" && prevType <> typ then "B-" + typ else tag
         prevType <- typ
         out |]

/// Positions where a tag sequence breaks IOB2: an I-X that does not follow B-X or I-X.
let iob2Violations (tags: string[]) : int[] =
    let mutable prevType = ""
    [| for i, tag in Array.indexed tags do
         let prefix, typ = splitTag tag
         if prefix = "I" && prevType <> typ then yield i
         prevType <- typ |]

// ---------------------------------------------------------------- files

/// How the file writes entity starts.
type TagScheme =
    /// B-X only where an entity directly follows another of type X (the original CoNLL-2003 files).
    | Iob1
    /// B-X at the start of every entity (the Hugging Face `conll2003` data set).
    | Iob2

/// What to read.
type ConllConfig =
    { /// 0-based column of the NER tag; None = the last column (English files have 4 columns, German 5).
      NerColumn: int option
      Scheme: TagScheme }

module ConllConfig =
    /// The original English release: IOB1, NER in the last column.
    let defaults = { NerColumn = None; Scheme = Iob1 }

/// One sentence: its words and IOB2 NER tags, and the file line of its first token.
type Sentence =
    { Words: string[]
      /// IOB2 tags (O, B-X, I-X), converted from IOB1 where the file is IOB1. // [L]
      Tags: string[]
      Line: int64 }

/// What a file held.
type ConllFile =
    { File: string
      Sentences: Sentence[]
      /// `-DOCSTART-` lines.
      Documents: int
      Tokens: int
      /// Tags that the IOB1 -> IOB2 conversion changed (I-X at an entity's start became B-X).
      ConvertedTags: int }

let private docStart = "-DOCSTART-"

/// The tag of a column as written, checked to be O, B-X or I-X.
let private checkTag (path: string) (lineNo: int64) (tag: string) =
    try splitTag tag |> ignore
    with :? ArgumentException -> fail path (Some lineNo) (sprintf "expected an NER tag O, B-TYPE or I-TYPE, got '%s'" tag)

/// Reads a CoNLL-2003 file. Errors (with file and line): a token line with fewer columns than the NER column
/// needs, a line whose column count differs from the file's first token line, a tag that is not O, B-X or I-X,
/// and, for `Iob2`, an I-X that does not continue an X entity (such a file is IOB1: say so in the config). A
/// file with no sentence is an error too.
let read (cfg: ConllConfig) (path: string) : ConllFile =
    match cfg.NerColumn with
    | Some c when c < 1 -> invalidArg "cfg" (sprintf "expected NerColumn >= 1 (column 0 is the word), got %d" c)
    | _ -> ()
    let sentences = ResizeArray<Sentence>()
    let words, tags, lines = ResizeArray<string>(), ResizeArray<string>(), ResizeArray<int64>()
    let mutable columns = 0
    let mutable documents, tokens, converted = 0, 0, 0
    let close () =
        if words.Count > 0 then
            let raw = tags.ToArray()
            let iob2 =
                match cfg.Scheme with
                | Iob1 -> iob1ToIob2 raw
                | Iob2 ->
                    match iob2Violations raw with
                    | [||] -> raw
                    | bad ->
                        let i = bad[0]
                        fail path (Some lines[i])
                            (sprintf "tag %s does not continue an entity of its type (IOB2 starts every entity with B-); this looks like IOB1: read it with Scheme = Iob1" raw[i])
            converted <- converted + (Array.map2 (<>) raw iob2 |> Array.filter id |> Array.length)
            sentences.Add { Words = words.ToArray(); Tags = iob2; Line = lines[0] }
            tokens <- tokens + words.Count
            words.Clear()
            tags.Clear()
            lines.Clear()
    for lineNo, line in readLines path do
        let fields = line.Split([| ' '; '\t' |], StringSplitOptions.RemoveEmptyEntries)
        if fields.Length = 0 then close ()
        elif fields[0] = docStart then
            close ()
            documents <- documents + 1
        else
            if columns = 0 then columns <- fields.Length
            let column = defaultArg cfg.NerColumn (columns - 1)
            if fields.Length <> columns then
                fail path (Some lineNo) (sprintf "expected %d space-separated columns (as the first token line), got %d: '%s'" columns fields.Length line)
            if column >= fields.Length || column < 1 then
                fail path (Some lineNo) (sprintf "expected the NER tag in column %d (0-based), but the line has %d columns: '%s'" column fields.Length line)
            checkTag path lineNo fields[column]
            words.Add fields[0]
            tags.Add fields[column]
            lines.Add lineNo
    close ()
    if sentences.Count = 0 then fail path None "expected CoNLL column lines (word ... NER tag), found no sentence"
    { File = path; Sentences = sentences.ToArray(); Documents = documents; Tokens = tokens; ConvertedTags = converted }

/// The three files of the English release in a folder: eng.train, eng.testa (validation) and eng.testb (test).
let splitFiles (dir: string) : string * string * string =
    let names = [| "eng.train"; "eng.testa"; "eng.testb" |]
    let missing = names |> Array.filter (fun n -> not (IO.File.Exists(IO.Path.Combine(dir, n))))
    if missing.Length > 0 then
        fail dir None (sprintf "expected the CoNLL-2003 files eng.train, eng.testa and eng.testb in this folder; missing: %s" (String.Join(", ", missing)))
    let at n = IO.Path.Combine(dir, n)
    at names[0], at names[1], at names[2]
