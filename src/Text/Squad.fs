/// SQuAD 1.1 (Rajpurkar et al. 2016) in its release JSON layout: `{"data": [{"title", "paragraphs":
/// [{"context", "qas": [{"id", "question", "answers": [{"answer_start", "text"}]}]}]}], "version"}`.
/// Contexts and questions are split into word tokens with character offsets; each answer's character start
/// is mapped to token indices, and answers whose ends fall inside a token (`1970` in `1970s`) are counted as
/// misaligned rather than silently moved. Bad input raises `DataException` naming the file and the JSON path.
/// Legend: L tokens of a context or question.
module Moe.Squad

open System
open System.IO
open System.Text.Json
open System.Text.RegularExpressions
open Moe.TextTools

/// A token and where it sits in its text: characters [Start, End).
type Token = { Text: string; Start: int; End: int }

/// Words (letters, digits and underscores, joined across inner hyphens, apostrophes and periods: `well-known`,
/// `don't`, `U.S`) and single punctuation characters; the split `../shared/data/glove-6b-50d-subset` measured
/// its coverage with, close to the Stanford tokenizer behind GloVe 6B's vocabulary.
let private tokenPattern = Regex(@"\w+(?:[-'’.]\w+)*|[^\w\s]", RegexOptions.Compiled)

/// The tokens of a text with their character offsets, in order.
let tokenize (text: string) : Token[] =
    if isNull text then invalidArg "text" "expected a text, got null"
    [| for m in tokenPattern.Matches text -> { Text = m.Value; Start = m.Index; End = m.Index + m.Length } |]

/// The first and last token (inclusive) whose characters are exactly [start, start + length), or None when the
/// span's start or end falls inside a token (or on white space): the answer does not align with the tokens.
let alignSpan (tokens: Token[]) (start: int) (length: int) : (int * int) option =
    if length < 1 then None
    else
        let first = tokens |> Array.tryFindIndex (fun t -> t.Start = start)
        let last = tokens |> Array.tryFindIndexBack (fun t -> t.End = start + length)
        match first, last with
        | Some s, Some e when e >= s -> Some(s, e)
        | _ -> None

/// The text of tokens first..last (inclusive) as it stands in the original text.
let spanText (text: string) (tokens: Token[]) (first: int) (last: int) : string =
    text.Substring(tokens[first].Start, tokens[last].End - tokens[first].Start)

/// One gold answer: its text, character start, and token span when it aligns with the context's tokens.
type Answer =
    { Text: string
      CharStart: int
      /// First and last context token (inclusive); None when the answer does not align (`alignSpan`).
      Tokens: (int * int) option }

/// One question with its context.
type Question =
    { Id: string
      Title: string
      Question: string
      QuestionTokens: Token[]
      Context: string
      ContextTokens: Token[]
      /// At least one; dev questions usually carry three (duplicates included, as released).
      Answers: Answer[] }

/// What a file held.
type SquadFile =
    { File: string
      Questions: Question[]
      Articles: int
      Paragraphs: int
      AnswerCount: int
      /// Answers whose characters do not align with the context's tokens.
      Misaligned: int
      /// Questions none of whose answers align (they cannot be trained on; they are still scored).
      QuestionsWithoutAlignedAnswer: int }

/// Reads a SQuAD 1.1 file. Errors (with the file and JSON path): malformed JSON, a missing or mistyped field, a
/// question without answers, and an `answer_start` that does not point at the answer's text in the context.
let read (path: string) : SquadFile =
    if not (File.Exists path) then fail path None "file not found (expected SQuAD 1.1 JSON)"
    use doc =
        try JsonDocument.Parse(File.ReadAllBytes path)
        with :? JsonException as e -> fail path None (sprintf "malformed JSON (%s)" e.Message)
    let bad (where: string) (what: string) : 'a = fail path None (sprintf "%s: %s" where what)
    let field (where: string) (o: JsonElement) (name: string) (kind: JsonValueKind) =
        if o.ValueKind <> JsonValueKind.Object then bad where "expected a JSON object"
        match o.TryGetProperty name with
        | true, v when v.ValueKind = kind -> v
        | true, v -> bad (sprintf "%s.%s" where name) (sprintf "expected a %O, got a %O" kind v.ValueKind)
        | _ -> bad where (sprintf "expected a field \"%s\"" name)
    let text where o name = (field where o name JsonValueKind.String).GetString()
    let items (array: JsonElement) = array.EnumerateArray() |> Seq.indexed
    let questions = ResizeArray<Question>()
    let mutable articles, paragraphs, answers, misaligned, unaligned = 0, 0, 0, 0, 0
    for a, article in field "$" doc.RootElement "data" JsonValueKind.Array |> items do
        let aw = sprintf "data[%d]" a
        let title = text aw article "title"
        articles <- articles + 1
        for p, paragraph in field aw article "paragraphs" JsonValueKind.Array |> items do
            let pw = sprintf "%s.paragraphs[%d]" aw p
            let context = text pw paragraph "context"
            let contextTokens = tokenize context
            paragraphs <- paragraphs + 1
            for q, qa in field pw paragraph "qas" JsonValueKind.Array |> items do
                let qw = sprintf "%s.qas[%d]" pw q
                let id = text qw qa "id"
                let question = text qw qa "question"
                let golds =
                    [| for i, ans in field qw qa "answers" JsonValueKind.Array |> items ->
                         let w = sprintf "%s.answers[%d] (question %s)" qw i id
                         let answerText = text w ans "text"
                         let start = (field w ans "answer_start" JsonValueKind.Number).GetInt32()
                         if start < 0 || start + answerText.Length > context.Length || String.CompareOrdinal(context, start, answerText, 0, answerText.Length) <> 0 then
                             bad w (sprintf "answer_start %d does not point at the answer \"%s\" in the context" start answerText)
                         { Text = answerText; CharStart = start; Tokens = alignSpan contextTokens start answerText.Length } |]
                if golds.Length = 0 then bad qw (sprintf "expected at least one answer for question %s, got none" id)
                answers <- answers + golds.Length
                let wrong = golds |> Array.filter (fun g -> g.Tokens.IsNone) |> Array.length
                misaligned <- misaligned + wrong
                if wrong = golds.Length then unaligned <- unaligned + 1
                questions.Add
                    { Id = id; Title = title; Question = question; QuestionTokens = tokenize question
                      Context = context; ContextTokens = contextTokens; Answers = golds }
    if questions.Count = 0 then fail path None "expected SQuAD questions under data[].paragraphs[].qas[], found none"
    { File = path; Questions = questions.ToArray(); Articles = articles; Paragraphs = paragraphs; AnswerCount = answers
      Misaligned = misaligned; QuestionsWithoutAlignedAnswer = unaligned }
