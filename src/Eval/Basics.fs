/// What every metric shares: the precision/recall/F1 triple, Python's text semantics (the reference scorers
/// are Python programs, so token boundaries must agree character for character), and the line-aligned text
/// files that predictions, references and documents come in.
///
/// Pure .NET: nothing in `Moe.Metrics` touches TorchSharp.
namespace Moe.Metrics

open System
open System.IO
open System.Text

/// Precision, recall and their harmonic mean, each a fraction in [0, 1].
type Prf = { Precision: float; Recall: float; F1: float }

/// The F1 arithmetic and the input files, opened with `Moe.Metrics`.
[<AutoOpen>]
module Basics =
    /// The all-zero score that rouge-score returns for empty inputs.
    let zeroPrf = { Precision = 0.0; Recall = 0.0; F1 = 0.0 }

    /// F1 = 2PR / (P + R), and 0 when P + R = 0 (rouge-score scoring.fmeasure).
    let fmeasure (precision: float) (recall: float) : float =
        if precision + recall > 0.0 then 2.0 * precision * recall / (precision + recall) else 0.0

    /// Reads a one-example-per-line file: strict UTF-8 (invalid bytes are an error naming the line), an optional
    /// UTF-8 byte order mark dropped, lines split on '\n' with one '\r' before it removed, and a last line kept
    /// whether or not the file ends with '\n'. An empty line is an example with empty text, never skipped.
    /// Raises `FileNotFoundException` or `InvalidDataException` with the path in the message.
    let readLines (path: string) : string[] =
        if not (File.Exists path) then
            raise (FileNotFoundException(sprintf "expected a text file at %s, but there is none" path, path))
        let bytes = File.ReadAllBytes path
        if bytes.Length = 0 then
            raise (InvalidDataException(sprintf "%s is empty; expected one example per line" path))
        let strict = UTF8Encoding(false, true)
        let text =
            try strict.GetString bytes
            with :? DecoderFallbackException as e ->
                let at = if e.Index >= 0 then e.Index else 0
                // The decoder reports the index of the bad byte; count the newlines before it for the line number.
                let line = 1 + (bytes |> Seq.take (min at bytes.Length) |> Seq.filter (fun b -> b = 10uy) |> Seq.length)
                raise (InvalidDataException(sprintf "%s:%d: not valid UTF-8 (bad byte near offset %d); expected UTF-8 text" path line at))
        let text = if text.Length > 0 && text[0] = '\uFEFF' then text.Substring 1 else text
        let lines = text.Split '\n'
        // "a\nb\n" holds two lines; the piece after the final newline is not an example.
        let lines = if lines.Length > 1 && lines[lines.Length - 1] = "" then lines[.. lines.Length - 2] else lines
        lines |> Array.map (fun l -> if l.EndsWith '\r' then l.Substring(0, l.Length - 1) else l)

    /// Raises `InvalidDataException` unless every named line array has the same length as the first.
    let expectAligned (named: (string * string[]) list) : unit =
        match named with
        | [] -> ()
        | (firstName, first) :: _ ->
            let bad = named |> List.filter (fun (_, lines) -> lines.Length <> first.Length)
            if not bad.IsEmpty then
                let counts = named |> List.map (fun (name, lines) -> sprintf "%s has %d" name lines.Length) |> String.concat ", "
                raise (InvalidDataException(sprintf "expected the same number of lines in every file (aligned by line, as %s), got: %s" firstName counts))

/// String helpers that reproduce the Python built-ins the reference scorers call, so that token boundaries
/// agree character for character.
module PyText =
    /// Python's `str.isspace` for one UTF-16 unit: .NET's white space plus U+001C..U+001F, which Python counts
    /// as space (bidirectional classes B and S) and .NET does not.
    let isSpace (c: char) : bool = Char.IsWhiteSpace c || (c >= '\u001C' && c <= '\u001F')

    /// Python's `str.split()` with no argument: runs of white space separate, no empty pieces.
    let split (s: string) : string[] =
        let parts = ResizeArray<string>()
        let mutable start = -1
        for i in 0 .. s.Length - 1 do
            if isSpace s[i] then
                if start >= 0 then
                    parts.Add(s.Substring(start, i - start))
                    start <- -1
            elif start < 0 then start <- i
        if start >= 0 then parts.Add(s.Substring start)
        parts.ToArray()

    /// Python's `str.rstrip()` with no argument.
    let rstrip (s: string) : string =
        let mutable e = s.Length
        while e > 0 && isSpace s[e - 1] do e <- e - 1
        s.Substring(0, e)

    /// Python's `str.lower()`. .NET's invariant lower case agrees per character except for U+0130 (capital I
    /// with dot), which Python maps to two characters "i\u0307" (Unicode SpecialCasing.txt). Python's
    /// final-sigma rule (word-final capital sigma becomes U+03C2) is not reproduced; it only touches Greek text.
    let lower (s: string) : string =
        if s.IndexOf '\u0130' < 0 then s.ToLowerInvariant()
        else s.ToLowerInvariant().Replace("\u0130", "i\u0307")
