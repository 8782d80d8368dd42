/// The Porter stemmer as NLTK implements it (nltk/stem/porter.py), in its three modes. rouge-score builds
/// `nltk.stem.porter.PorterStemmer()` with no argument, which is `Nltk` mode.
/// Porter, M. "An algorithm for suffix stripping." Program 14.3 (1980): 130-137.
///
/// Pure .NET: nothing here touches TorchSharp.
module Moe.Metrics.Porter

open System
open System.Collections.Generic

/// Which variant of the algorithm.
type Mode =
    /// The 1980 paper as published.
    | Original
    /// With the departures Martin Porter made in his own implementations (tartarus.org/martin/PorterStemmer).
    | Martin
    /// Martin's departures plus NLTK's own (NLTK's default, and rouge-score's).
    | Nltk

/// NLTK mode's irregular forms: word -> stem (nltk porter.py `irregular_forms`).
let irregularForms : IReadOnlyDictionary<string, string> =
    [ "sky", [ "sky"; "skies" ]
      "die", [ "dying" ]
      "lie", [ "lying" ]
      "tie", [ "tying" ]
      "news", [ "news" ]
      "inning", [ "innings"; "inning" ]
      "outing", [ "outings"; "outing" ]
      "canning", [ "cannings"; "canning" ]
      "howe", [ "howe" ]
      "proceed", [ "proceed" ]
      "exceed", [ "exceed" ]
      "succeed", [ "succeed" ] ]
    |> List.collect (fun (stem, forms) -> forms |> List.map (fun f -> f, stem))
    |> readOnlyDict

/// A consonant is a letter other than a, e, i, o, u, and other than y preceded by a consonant.
let rec private isConsonant (w: string) (i: int) : bool =
    match w[i] with
    | 'a' | 'e' | 'i' | 'o' | 'u' -> false
    | 'y' -> i = 0 || not (isConsonant w (i - 1))
    | _ -> true

/// m in [C](VC){m}[V]: the number of vowel-consonant boundaries.
let private measure (stem: string) : int =
    let mutable m = 0
    for i in 1 .. stem.Length - 1 do
        if not (isConsonant stem (i - 1)) && isConsonant stem i then m <- m + 1
    m

let private positiveMeasure (stem: string) = measure stem > 0

let private containsVowel (stem: string) =
    seq { 0 .. stem.Length - 1 } |> Seq.exists (fun i -> not (isConsonant stem i))

/// Condition *d: ends with a double consonant.
let private endsDoubleConsonant (w: string) =
    w.Length >= 2 && w[w.Length - 1] = w[w.Length - 2] && isConsonant w (w.Length - 1)

/// Condition *o: ends consonant-vowel-consonant, the last not w, x or y; NLTK mode also accepts a
/// two-letter vowel-consonant word.
let private endsCvc (mode: Mode) (w: string) =
    (w.Length >= 3
     && isConsonant w (w.Length - 3)
     && not (isConsonant w (w.Length - 2))
     && isConsonant w (w.Length - 1)
     && not (w[w.Length - 1] = 'w' || w[w.Length - 1] = 'x' || w[w.Length - 1] = 'y'))
    || (mode = Nltk && w.Length = 2 && not (isConsonant w 0) && isConsonant w 1)

/// One suffix rule: the first rule whose suffix matches decides, whether or not its condition holds.
type private Rule =
    | Suffix of suffix: string * replacement: string * condition: (string -> bool)
    /// Porter's "*d" pseudo-suffix: a double consonant, replaced as a unit.
    | DoubleConsonant of replacement: string * condition: (string -> bool)

let private always (_: string) = true

let private chop (w: string) (suffix: string) = w.Substring(0, w.Length - suffix.Length)

let private applyRules (word: string) (rules: Rule list) : string =
    let rec go rules =
        match rules with
        | [] -> word
        | DoubleConsonant(replacement, condition) :: rest ->
            if endsDoubleConsonant word then
                let stem = word.Substring(0, word.Length - 2)
                if condition stem then stem + replacement else word
            else go rest
        | Suffix(suffix, replacement, condition) :: rest ->
            if word.EndsWith(suffix, StringComparison.Ordinal) then
                let stem = chop word suffix
                if condition stem then stem + replacement else word
            else go rest
    go rules

let private step1a mode (word: string) =
    // NLTK: 'flies' -> 'fli' but 'dies' -> 'die'.
    if mode = Nltk && word.EndsWith("ies", StringComparison.Ordinal) && word.Length = 4 then chop word "ies" + "ie"
    else
        applyRules word [ Suffix("sses", "ss", always); Suffix("ies", "i", always); Suffix("ss", "ss", always); Suffix("s", "", always) ]

let private step1b mode (word: string) =
    if mode = Nltk && word.EndsWith("ied", StringComparison.Ordinal) then
        // NLTK: 'spied' -> 'spi' but 'died' -> 'die'.
        if word.Length = 4 then chop word "ied" + "ie" else chop word "ied" + "i"
    elif word.EndsWith("eed", StringComparison.Ordinal) then
        let stem = chop word "eed"
        if measure stem > 0 then stem + "ee" else word
    else
        let stripped =
            [ "ed"; "ing" ]
            |> List.tryPick (fun suffix ->
                if word.EndsWith(suffix, StringComparison.Ordinal) then
                    let stem = chop word suffix
                    if containsVowel stem then Some stem else None
                else None)
        match stripped with
        | None -> word
        | Some stem ->
            let last = stem[stem.Length - 1]
            applyRules stem [
                Suffix("at", "ate", always)
                Suffix("bl", "ble", always)
                Suffix("iz", "ize", always)
                DoubleConsonant(string last, fun _ -> not (last = 'l' || last = 's' || last = 'z'))
                Suffix("", "e", fun s -> measure s = 1 && endsCvc mode s) ]

let private step1c mode (word: string) =
    let condition =
        match mode with
        // NLTK: y -> i only after a consonant that is not the whole stem ('happy' -> 'happi', 'enjoy' stays).
        | Nltk -> fun (s: string) -> s.Length > 1 && isConsonant s (s.Length - 1)
        | Original | Martin -> containsVowel
    applyRules word [ Suffix("y", "i", condition) ]

let rec private step2 mode (word: string) : string =
    let alli = "alli"
    if mode = Nltk && word.EndsWith(alli, StringComparison.Ordinal) && positiveMeasure (chop word alli) then
        // NLTK applies ALLI -> AL first and runs the result through step 2 again.
        step2 mode (chop word alli + "al")
    else
        let common =
            [ Suffix("ational", "ate", positiveMeasure)
              Suffix("tional", "tion", positiveMeasure)
              Suffix("enci", "ence", positiveMeasure)
              Suffix("anci", "ance", positiveMeasure)
              Suffix("izer", "ize", positiveMeasure)
              (if mode = Original then Suffix("abli", "able", positiveMeasure) else Suffix("bli", "ble", positiveMeasure))
              Suffix("alli", "al", positiveMeasure)
              Suffix("entli", "ent", positiveMeasure)
              Suffix("eli", "e", positiveMeasure)
              Suffix("ousli", "ous", positiveMeasure)
              Suffix("ization", "ize", positiveMeasure)
              Suffix("ation", "ate", positiveMeasure)
              Suffix("ator", "ate", positiveMeasure)
              Suffix("alism", "al", positiveMeasure)
              Suffix("iveness", "ive", positiveMeasure)
              Suffix("fulness", "ful", positiveMeasure)
              Suffix("ousness", "ous", positiveMeasure)
              Suffix("aliti", "al", positiveMeasure)
              Suffix("iviti", "ive", positiveMeasure)
              Suffix("biliti", "ble", positiveMeasure) ]
        let extra =
            match mode with
            // NLTK keeps the 'l' of 'logi' with the stem so that short stems ('geo', 'theo') qualify.
            | Nltk -> [ Suffix("fulli", "ful", positiveMeasure); Suffix("logi", "log", fun _ -> positiveMeasure (word.Substring(0, word.Length - 3))) ]
            | Martin -> [ Suffix("logi", "log", positiveMeasure) ]
            | Original -> []
        applyRules word (common @ extra)

let private step3 (word: string) =
    applyRules word [
        Suffix("icate", "ic", positiveMeasure)
        Suffix("ative", "", positiveMeasure)
        Suffix("alize", "al", positiveMeasure)
        Suffix("iciti", "ic", positiveMeasure)
        Suffix("ical", "ic", positiveMeasure)
        Suffix("ful", "", positiveMeasure)
        Suffix("ness", "", positiveMeasure) ]

let private step4 (word: string) =
    let gt1 (s: string) = measure s > 1
    applyRules word [
        for suffix in [ "al"; "ance"; "ence"; "er"; "ic"; "able"; "ible"; "ant"; "ement"; "ment"; "ent" ] do
            Suffix(suffix, "", gt1)
        Suffix("ion", "", fun s -> measure s > 1 && (s[s.Length - 1] = 's' || s[s.Length - 1] = 't'))
        for suffix in [ "ou"; "ism"; "ate"; "iti"; "ous"; "ive"; "ize" ] do
            Suffix(suffix, "", gt1) ]

/// Step 5a tries both of its rules (m > 1, then m = 1 and not *o), so it is not a first-match rule list.
let private step5a mode (word: string) =
    if word.EndsWith 'e' then
        let stem = chop word "e"
        if measure stem > 1 then stem
        elif measure stem = 1 && not (endsCvc mode stem) then stem
        else word
    else word

let private step5b (word: string) =
    applyRules word [ Suffix("ll", "l", fun _ -> measure (word.Substring(0, word.Length - 1)) > 1) ]

/// The stem of one word (lower-cased first, as NLTK's `stem(word)` does by default).
let stem (mode: Mode) (word: string) : string =
    let lowered = word.ToLowerInvariant()
    match mode with
    | Nltk when irregularForms.ContainsKey word -> irregularForms[lowered]
    // Martin's and NLTK's versions leave words of one or two letters alone.
    | Martin | Nltk when word.Length <= 2 -> lowered
    | _ ->
        lowered
        |> step1a mode
        |> step1b mode
        |> step1c mode
        |> step2 mode
        |> step3
        |> step4
        |> step5a mode
        |> step5b
