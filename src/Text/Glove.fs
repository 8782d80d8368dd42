/// GloVe word vectors (Pennington, Socher & Manning 2014) in their text release (`glove.6B.50d.txt`: one word
/// per line, then its vector's components, separated by single spaces, no header), and the vocabulary a model
/// embeds with them: the data's words that have a vector, plus padding, unknown and separator tokens.
/// Bad input raises `DataException` naming the file and line.
/// Legend: V vocabulary, De vector width.
module Moe.Glove

open System
open System.Collections.Generic
open System.Globalization
open System.IO
open Moe.TextTools

/// Vectors read from one or more files.
type Vectors =
    { /// Word -> vector (De float32 components).
      Table: Dictionary<string, float32[]>
      Dim: int
      Files: string list
      /// Lines read (vectors offered, kept or not).
      Lines: int
      /// Words seen again after their first line (the first vector is kept), as in GloVe 840B's few repeats.
      Duplicates: int }

/// Reads GloVe text files, keeping only the words `keep` accepts (so a 400k-word file costs only the data's
/// words). The vector width is the first line's; every line must have a word and that many numbers. Errors
/// name the file and line: a line with a different number of fields, or a field that is not a finite number.
let read (keep: string -> bool) (paths: string list) : Vectors =
    if paths.IsEmpty then invalidArg "paths" "expected at least one GloVe vector file, got none"
    let table = Dictionary<string, float32[]>(StringComparer.Ordinal)
    let seen = HashSet<string>(StringComparer.Ordinal)
    let mutable dim, lines, duplicates = 0, 0, 0
    for path in paths do
        for lineNo, line in readLines path do
            if line.Length > 0 then
                lines <- lines + 1
                let fields = line.Split ' '
                if dim = 0 then
                    if fields.Length < 2 then fail path (Some lineNo) "expected a word followed by its vector's numbers, got one field"
                    dim <- fields.Length - 1
                if fields.Length <> dim + 1 then
                    fail path (Some lineNo) (sprintf "expected a word and %d numbers separated by single spaces (the width of the first vector), got %d fields" dim fields.Length)
                let word = fields[0]
                if not (seen.Add word) then duplicates <- duplicates + 1
                elif keep word then
                    let v = Array.zeroCreate<float32> dim
                    for i in 1 .. dim do
                        match Single.TryParse(fields[i], NumberStyles.Float, CultureInfo.InvariantCulture) with
                        | true, x when Single.IsFinite x -> v[i - 1] <- x
                        | _ -> fail path (Some lineNo) (sprintf "expected a number in field %d of the vector of '%s', got '%s'" (i + 1) word fields[i])
                    table[word] <- v
            else
                fail path (Some lineNo) "expected a word and its vector, got an empty line"
    if lines = 0 then fail (String.Join(", ", paths)) None "expected GloVe vector lines, found none"
    { Table = table; Dim = dim; Files = paths; Lines = lines; Duplicates = duplicates }

/// The vector files of a path: the file itself, or every `*.txt` of a folder in name order.
let files (path: string) : string list =
    if File.Exists path then [ path ]
    elif Directory.Exists path then
        match Directory.GetFiles(path, "*.txt") |> Array.sort |> List.ofArray with
        | [] -> fail path None "expected GloVe vector files (*.txt) in this folder, found none"
        | fs -> fs
    else fail path None "expected a GloVe vector file or a folder of them; there is none"

/// Ids of the special tokens, before the words.
let padId = 0
let unknownId = 1
/// Separates a question from its context in the concatenated QA layout.
let separatorId = 2
/// Names of the special tokens, by id.
let specialTokens = [| "<pad>"; "<unk>"; "<sep>" |]

/// The words a model embeds: the special tokens, then every data word that has a GloVe vector.
type Vocabulary =
    { /// Id -> word; the first `specialTokens.Length` are the special tokens. // [V]
      Words: string[]
      /// Word (as looked up, e.g. lower-cased) -> id.
      Index: Dictionary<string, int>
      /// Each word's GloVe vector; zeros for the special tokens (the model learns those). // [V; De]
      Vectors: float32[][]
      /// Whether words are lower-cased before lookup (GloVe 6B's vocabulary is lower case).
      Lowercase: bool
      /// Distinct data words offered, and those with a vector.
      Types: int
      CoveredTypes: int
      /// Data tokens offered, and those with a vector (the rest map to `unknownId`).
      Tokens: int64
      CoveredTokens: int64 }

let private key (lowercase: bool) (word: string) = if lowercase then word.ToLowerInvariant() else word

/// The vocabulary of `words` (every token of the data, repeats included) pruned to GloVe: the words with a
/// vector in `paths`, most frequent first (ties by word), after the special tokens.
let vocabulary (lowercase: bool) (paths: string list) (words: seq<string>) : Vocabulary =
    let counts = Dictionary<string, int64>(StringComparer.Ordinal)
    for w in words do
        let k = key lowercase w
        counts[k] <- (match counts.TryGetValue k with | true, n -> n + 1L | _ -> 1L)
    let vectors = read counts.ContainsKey paths
    let covered = counts |> Seq.filter (fun kv -> vectors.Table.ContainsKey kv.Key) |> Seq.sortBy (fun kv -> -kv.Value, kv.Key) |> Seq.toArray
    let words = Array.append specialTokens (covered |> Array.map (fun kv -> kv.Key))
    let index = Dictionary<string, int>(StringComparer.Ordinal)
    words |> Array.iteri (fun i w -> if i >= specialTokens.Length then index[w] <- i)
    { Words = words
      Index = index
      Vectors = words |> Array.mapi (fun i w -> if i < specialTokens.Length then Array.zeroCreate vectors.Dim else vectors.Table[w])
      Lowercase = lowercase
      Types = counts.Count
      CoveredTypes = covered.Length
      Tokens = counts.Values |> Seq.sum
      CoveredTokens = covered |> Array.sumBy (fun kv -> kv.Value) }

/// The id of a word: its vocabulary id, or `unknownId`.
let idOf (v: Vocabulary) (word: string) : int =
    match v.Index.TryGetValue(key v.Lowercase word) with
    | true, i -> i
    | _ -> unknownId
