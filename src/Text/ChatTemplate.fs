/// Chat templates of Hugging Face checkpoint folders: `tokenizer_config.json`'s `chat_template` (Jinja) rendered
/// as `transformers`' `apply_chat_template` renders it (v4.45.1, utils/chat_template_utils.py: a sandboxed
/// Jinja environment with `trim_blocks` and `lstrip_blocks`, the loop controls `break`/`continue`, globals
/// `raise_exception` and `strftime_now`, and a `tojson` filter that is Python's `json.dumps` with
/// `ensure_ascii=False` and an optional `indent`), then tokenized without adding special tokens again.
///
/// No Jinja engine is available as a .NET package here, so this file is a small interpreter of the subset that
/// chat templates use: text, `{{ }}`, `{% if/elif/else %}`, `{% for %}` (with `loop`, tuple targets, an `if`
/// filter and `else`), `{% set %}` (names, tuples, `namespace()` attributes, block set), `{% break/continue %}`,
/// `{% generation %}`, comments, whitespace control (`-` and `+`), Python-like values and operators, the common
/// filters, tests and string/dict methods. Anything else (macros, includes, unknown filters or methods, ...) is
/// an error naming the construct and the template line, never a silently different prompt.
module Moe.ChatTemplate

open System
open System.Collections.Generic
open System.Globalization
open System.IO
open System.Text
open System.Text.Json


// ---------------------------------------------------------------------------------------------------------
// Values (Python's, as Jinja sees them)

/// A template value. `Undefined` carries the expression that produced it, for error messages.
[<NoEquality; NoComparison>]
type Value =
    | Undefined of what: string
    | Null
    | Bool of bool
    | Int of int64
    | Float of float
    | Str of string
    | List of Value list
    /// A dict with string keys, in insertion order (as Python keeps them, and as `tojson` writes them).
    | Dict of (string * Value) list
    /// `namespace(...)`: the one mutable value, assigned with `{% set ns.x = ... %}`.
    | Namespace of Dictionary<string, Value>
    | Func of name: string * call: (Value list -> (string * Value) list -> Value)

/// A template that cannot be parsed or rendered; the public functions turn it into a failure naming the
/// template and line.
exception internal TemplateError of string

let private fail fmt = Printf.kprintf (fun s -> raise (TemplateError s)) fmt

/// A JSON element as a template value (numbers without a fraction or exponent are integers, as Python reads them).
let rec ofJson (e: JsonElement) : Value =
    match e.ValueKind with
    | JsonValueKind.Null | JsonValueKind.Undefined -> Null
    | JsonValueKind.True -> Bool true
    | JsonValueKind.False -> Bool false
    | JsonValueKind.String -> Str(e.GetString())
    | JsonValueKind.Number ->
        let raw = e.GetRawText()
        match Int64.TryParse(raw, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture) with
        | true, i -> Int i
        | _ -> Float(e.GetDouble())
    | JsonValueKind.Array -> List [ for x in e.EnumerateArray() -> ofJson x ]
    | _ -> Dict [ for p in e.EnumerateObject() -> p.Name, ofJson p.Value ]

/// A chat message `{"role": role, "content": content}`.
let message (role: string, content: string) : Value = Dict [ "role", Str role; "content", Str content ]

let private typeName (v: Value) =
    match v with
    | Undefined _ -> "undefined"
    | Null -> "none"
    | Bool _ -> "boolean"
    | Int _ -> "integer"
    | Float _ -> "float"
    | Str _ -> "string"
    | List _ -> "list"
    | Dict _ -> "dict"
    | Namespace _ -> "namespace"
    | Func _ -> "function"

/// Python's repr of a float: the shortest text that reads back, with ".0" on whole numbers.
let private pyFloat (f: float) =
    if Double.IsNaN f then "nan"
    elif Double.IsPositiveInfinity f then "inf"
    elif Double.IsNegativeInfinity f then "-inf"
    else
        let s = f.ToString("R", CultureInfo.InvariantCulture)
        let s = if s.Contains "E" then s.Replace("E", "e").Replace("e-0", "e-").Replace("e+0", "e+") else s
        let s = if s.Contains "e" && not (s.Contains "e-") && not (s.Contains "e+") then s.Replace("e", "e+") else s
        if s.Contains "." || s.Contains "e" then s else s + ".0"

/// A quoted string literal: backslash escapes for the quote, the backslash, newline, carriage return and tab;
/// `named` gives other control characters' short escapes, `control` the rest.
let private quoted (quote: char) (named: char -> string option) (control: char -> string) (s: string) : string =
    let sb = StringBuilder().Append(quote)
    for c in s do
        sb.Append(
            match c with
            | '\\' -> "\\\\"
            | '\n' -> "\\n"
            | '\r' -> "\\r"
            | '\t' -> "\\t"
            | c when c = quote -> "\\" + string c
            | c when c < ' ' -> named c |> Option.defaultWith (fun () -> control c)
            | c -> string c)
        |> ignore
    sb.Append(quote).ToString()

/// Python's repr of a string (single quotes unless the text has one and no double quote).
let private pyRepr (s: string) =
    let quote = if s.Contains "'" && not (s.Contains "\"") then '"' else '\''
    quoted quote (fun _ -> None) (fun c -> sprintf "\\x%02x" (int c)) s

/// A JSON string as Python's json.dumps writes it with ensure_ascii=False.
let private jsonString (s: string) =
    let named c = match c with '\b' -> Some "\\b" | '\f' -> Some "\\f" | _ -> None
    quoted '"' named (fun c -> sprintf "\\u%04x" (int c)) s

/// Python's `str(value)`, which `{{ }}` prints (an undefined value prints nothing, as in Jinja).
let rec toText (v: Value) : string =
    match v with
    | Undefined _ -> ""
    | Str s -> s
    | _ -> repr v

and private repr (v: Value) : string =
    match v with
    | Undefined _ -> ""
    | Null -> "None"
    | Bool b -> if b then "True" else "False"
    | Int i -> i.ToString(CultureInfo.InvariantCulture)
    | Float f -> pyFloat f
    | Str s -> pyRepr s
    | List xs -> "[" + String.Join(", ", xs |> List.map repr) + "]"
    | Dict kvs -> "{" + String.Join(", ", kvs |> List.map (fun (k, x) -> pyRepr k + ": " + repr x)) + "}"
    | Namespace d -> "<Namespace " + repr (Dict [ for kv in d -> kv.Key, kv.Value ]) + ">"
    | Func(name, _) -> "<function " + name + ">"

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent, separators=..., sort_keys=...)`.
let toJson (indent: int option) (separators: (string * string) option) (sortKeys: bool) (v: Value) : string =
    let itemSep, keySep =
        match separators, indent with
        | Some s, _ -> s
        | None, Some _ -> ",", ": "
        | None, None -> ", ", ": "
    let sb = StringBuilder()
    let str (s: string) = sb.Append(jsonString s) |> ignore
    let newline (depth: int) =
        match indent with
        | Some n -> sb.Append('\n').Append(' ', n * depth) |> ignore
        | None -> ()
    let rec write (depth: int) (v: Value) =
        let many (opening: char) (closing: char) (items: 'a list) (one: 'a -> unit) =
            if List.isEmpty items then sb.Append(opening).Append(closing) |> ignore
            else
                sb.Append(opening) |> ignore
                items |> List.iteri (fun i x ->
                    if i > 0 then sb.Append(itemSep) |> ignore
                    newline (depth + 1)
                    one x)
                newline depth
                sb.Append(closing) |> ignore
        match v with
        | Null -> sb.Append("null") |> ignore
        | Bool b -> sb.Append(if b then "true" else "false") |> ignore
        | Int i -> sb.Append(i) |> ignore
        | Float f when Double.IsNaN f -> sb.Append("NaN") |> ignore
        | Float f when Double.IsPositiveInfinity f -> sb.Append("Infinity") |> ignore
        | Float f when Double.IsNegativeInfinity f -> sb.Append("-Infinity") |> ignore
        | Float f -> sb.Append(pyFloat f) |> ignore
        | Str s -> str s
        | List xs -> many '[' ']' xs (write (depth + 1))
        | Dict kvs ->
            let kvs = if sortKeys then kvs |> List.sortWith (fun (a, _) (b, _) -> String.CompareOrdinal(a, b)) else kvs
            many '{' '}' kvs (fun (k, x) -> str k; sb.Append(keySep) |> ignore; write (depth + 1) x)
        | Namespace d -> write depth (Dict [ for kv in d -> kv.Key, kv.Value ])
        | Undefined what -> fail "tojson: %s is undefined (Python's json.dumps cannot write it)" what
        | Func(name, _) -> fail "tojson: cannot write the function %s" name
    write 0 v
    sb.ToString()


// ---------------------------------------------------------------------------------------------------------
// Lexer: the template's text and tags, then each tag's tokens

type private Tok =
    | TName of string
    | TStr of string
    | TInt of int64
    | TFloat of float
    | TOp of string
    | TEnd

type private Token = { Tok: Tok; Line: int }

type private TagKind =
    | Output
    | Statement
    | Comment

/// A piece of the template before whitespace control: text, or a tag with its `-`/`+` modifiers.
type private Piece =
    | PText of string
    | PTag of kind: TagKind * tokens: Token list * left: char * right: char * line: int

let private describe (t: Tok) =
    match t with
    | TName n -> n
    | TStr s -> pyRepr s
    | TInt i -> string i
    | TFloat f -> pyFloat f
    | TOp o -> o
    | TEnd -> "the end of the tag"

/// Operator tokens, longest first so `//` is not read as two `/`.
let private operators = [ "//"; "**"; "=="; "!="; "<="; ">="; "+"; "-"; "*"; "/"; "%"; "~"; "("; ")"; "["; "]"; "{"; "}"; "."; ","; ":"; "|"; "<"; ">"; "=" ]

/// A string literal's escapes, as Python's unicode-escape reads them (unknown escapes keep their backslash).
let private unescape (line: int) (raw: string) =
    let sb = StringBuilder()
    let mutable i = 0
    while i < raw.Length do
        let c = raw.[i]
        if c = '\\' && i + 1 < raw.Length then
            let e = raw.[i + 1]
            let hex (n: int) =
                if i + 2 + n > raw.Length then fail "line %d: truncated \\%c escape in a string" line e
                sb.Append(char (Convert.ToInt32(raw.Substring(i + 2, n), 16))) |> ignore
                i <- i + 2 + n
            match e with
            | 'n' -> sb.Append('\n') |> ignore; i <- i + 2
            | 't' -> sb.Append('\t') |> ignore; i <- i + 2
            | 'r' -> sb.Append('\r') |> ignore; i <- i + 2
            | '\\' | '\'' | '"' -> sb.Append(e) |> ignore; i <- i + 2
            | 'b' -> sb.Append('\b') |> ignore; i <- i + 2
            | 'f' -> sb.Append('\f') |> ignore; i <- i + 2
            | '0' -> sb.Append('\000') |> ignore; i <- i + 2
            | 'x' -> hex 2
            | 'u' -> hex 4
            | '\n' -> i <- i + 2
            | _ -> sb.Append(c) |> ignore; i <- i + 1
        else
            sb.Append(c) |> ignore
            i <- i + 1
    sb.ToString()

/// Splits the template into text and tags; a tag's expression is tokenized up to its closing delimiter (outside
/// strings and brackets, as Jinja's lexer does).
let private lex (template: string) : Piece list =
    // Jinja drops one newline at the end of the template (keep_trailing_newline is off).
    let src =
        if template.EndsWith "\r\n" then template.Substring(0, template.Length - 2)
        elif template.EndsWith "\n" then template.Substring(0, template.Length - 1)
        else template
    let pieces = ResizeArray<Piece>()
    let mutable pos = 0
    let mutable line = 1
    let advanceTo (target: int) =
        for k in pos .. target - 1 do
            if src.[k] = '\n' then line <- line + 1
        pos <- target
    let nextOpen (from: int) =
        let candidates =
            [ "{{"; "{%"; "{#" ] |> List.map (fun o -> src.IndexOf(o, from, StringComparison.Ordinal)) |> List.filter (fun i -> i >= 0)
        if candidates.IsEmpty then -1 else List.min candidates
    let at (i: int) (s: string) = String.CompareOrdinal(src, i, s, 0, s.Length) = 0
    while pos < src.Length do
        let i = nextOpen pos
        if i < 0 then
            pieces.Add(PText(src.Substring pos))
            advanceTo src.Length
        else
            if i > pos then pieces.Add(PText(src.Substring(pos, i - pos)))
            advanceTo i
            let tagLine = line
            let kind = match src.[i + 1] with '{' -> Output | '%' -> Statement | _ -> Comment
            let mutable j = i + 2
            let left = if j < src.Length && (src.[j] = '-' || src.[j] = '+') then (j <- j + 1; src.[j - 1]) else ' '
            match kind with
            | Comment ->
                let close = src.IndexOf("#}", j, StringComparison.Ordinal)
                if close < 0 then fail "line %d: a comment {# is never closed with #}" tagLine
                let right = if close > j && (src.[close - 1] = '-' || src.[close - 1] = '+') then src.[close - 1] else ' '
                pieces.Add(PTag(Comment, [], left, right, tagLine))
                advanceTo (close + 2)
            | _ ->
                let closer = if kind = Output then "}}" else "%}"
                let tokens = ResizeArray<Token>()
                let mutable depth = 0
                let mutable right = '\000'
                advanceTo j
                while right = '\000' do
                    let k = pos
                    if k >= src.Length then fail "line %d: a tag opened here is never closed with %s" tagLine closer
                    let c = src.[k]
                    if Char.IsWhiteSpace c then advanceTo (k + 1)
                    elif depth = 0 && at k closer then
                        right <- ' '
                        advanceTo (k + 2)
                    elif depth = 0 && (c = '-' || c = '+') && at (k + 1) closer then
                        right <- c
                        advanceTo (k + 3)
                    elif c = '\'' || c = '"' then
                        let mutable e = k + 1
                        while e < src.Length && src.[e] <> c do
                            e <- e + (if src.[e] = '\\' then 2 else 1)
                        if e >= src.Length then fail "line %d: a string literal is never closed" line
                        tokens.Add { Tok = TStr(unescape line (src.Substring(k + 1, e - k - 1))); Line = line }
                        advanceTo (e + 1)
                    elif Char.IsDigit c then
                        let mutable e = k
                        while e < src.Length && (Char.IsDigit src.[e] || src.[e] = '_') do e <- e + 1
                        let isFloat = e + 1 < src.Length && src.[e] = '.' && Char.IsDigit src.[e + 1]
                        if isFloat then
                            e <- e + 1
                            while e < src.Length && (Char.IsDigit src.[e] || src.[e] = '_') do e <- e + 1
                        if e < src.Length && (src.[e] = 'e' || src.[e] = 'E') then
                            let s = if e + 1 < src.Length && (src.[e + 1] = '+' || src.[e + 1] = '-') then e + 2 else e + 1
                            if s < src.Length && Char.IsDigit src.[s] then
                                e <- s
                                while e < src.Length && Char.IsDigit src.[e] do e <- e + 1
                        let text = src.Substring(k, e - k).Replace("_", "")
                        let tok =
                            if text.Contains "." || text.Contains "e" || text.Contains "E" then TFloat(Double.Parse(text, CultureInfo.InvariantCulture))
                            else TInt(Int64.Parse(text, CultureInfo.InvariantCulture))
                        tokens.Add { Tok = tok; Line = line }
                        advanceTo e
                    elif Char.IsLetter c || c = '_' then
                        let mutable e = k
                        while e < src.Length && (Char.IsLetterOrDigit src.[e] || src.[e] = '_') do e <- e + 1
                        tokens.Add { Tok = TName(src.Substring(k, e - k)); Line = line }
                        advanceTo e
                    else
                        match operators |> List.tryFind (at k) with
                        | Some op ->
                            if op = "(" || op = "[" || op = "{" then depth <- depth + 1
                            if op = ")" || op = "]" || op = "}" then depth <- max 0 (depth - 1)
                            tokens.Add { Tok = TOp op; Line = line }
                            advanceTo (k + op.Length)
                        | None -> fail "line %d: unexpected character '%c' inside a tag" line c
                pieces.Add(PTag(kind, List.ofSeq tokens, left, right, tagLine))
    List.ofSeq pieces

/// Jinja's whitespace control with `trim_blocks` and `lstrip_blocks` on: `-` strips all whitespace on its side;
/// a statement or comment tag removes the one newline after it, and the spaces and tabs before it when they
/// start a line (unless written with `+`).
let private controlWhitespace (pieces: Piece list) : Piece list =
    let arr = Array.ofList pieces
    let isBlock kind = kind = Statement || kind = Comment
    arr
    |> Array.mapi (fun i p ->
        match p with
        | PTag _ -> p
        | PText text ->
            let mutable t = text
            // Whether the text starts a line: at the template's start, or after a newline its tag consumed.
            let mutable startsLine = (i = 0)
            match (if i > 0 then Some arr.[i - 1] else None) with
            | Some(PTag(_, _, _, '-', _)) -> t <- t.TrimStart()
            | Some(PTag(kind, _, _, right, _)) when isBlock kind && right <> '+' ->
                if t.StartsWith "\r\n" then
                    t <- t.Substring 2
                    startsLine <- true
                elif t.StartsWith "\n" then
                    t <- t.Substring 1
                    startsLine <- true
            | _ -> ()
            match (if i + 1 < arr.Length then Some arr.[i + 1] else None) with
            | Some(PTag(_, _, '-', _, _)) -> t <- t.TrimEnd()
            | Some(PTag(kind, _, left, _, _)) when isBlock kind && left <> '+' ->
                let lineStart = t.LastIndexOf '\n' + 1
                if (lineStart > 0 || startsLine) && t.Substring lineStart |> Seq.forall (fun c -> c = ' ' || c = '\t') then
                    t <- t.Substring(0, lineStart)
            | _ -> ()
            PText t)
    |> List.ofArray


// ---------------------------------------------------------------------------------------------------------
// Syntax

type internal Expr =
    | Lit of Value
    | Var of string
    | Attr of Expr * string
    | Index of Expr * Expr
    | Slice of Expr * Expr option * Expr option * Expr option
    | Call of Expr * Expr list * (string * Expr) list
    | Filter of Expr * string * Expr list * (string * Expr) list
    | Test of Expr * string * negated: bool * Expr list
    | Not of Expr
    | Neg of Expr
    | And of Expr * Expr
    | Or of Expr * Expr
    | Binary of string * Expr * Expr
    | Compare of Expr * (string * Expr) list
    | Cond of test: Expr * yes: Expr * no: Expr option
    | ListLit of Expr list
    | DictLit of (Expr * Expr) list

type internal SetTarget =
    | Names of string list
    | Attribute of string * string

type internal Node =
    | Literal of string
    | Print of Expr * line: int
    | If of branches: (Expr * Node list) list * otherwise: Node list * line: int
    | For of targets: string list * items: Expr * filter: Expr option * body: Node list * otherwise: Node list * line: int
    | Set of SetTarget * Expr * line: int
    | SetBlock of string * Node list * line: int
    | Break of line: int
    | Continue of line: int

/// Statements this interpreter does not run, with what they are.
let private unsupportedStatements =
    dict [ "macro", "macros"; "call", "call blocks"; "filter", "filter blocks"; "include", "includes"
           "import", "imports"; "from", "imports"; "extends", "template inheritance"; "block", "template blocks"
           "raw", "raw blocks"; "with", "with blocks"; "do", "expression statements"; "autoescape", "autoescape blocks"
           "trans", "i18n blocks"; "endmacro", "macros" ]

/// Recursive-descent parser of one tag's tokens, with Jinja's precedence: conditional, or, and, not,
/// comparisons (`in`, `not in`), `+ -`, `~`, `* / // %`, `**`, unary minus, then filters and tests on a
/// primary with its attributes, subscripts and calls.
type private Parser(tokens: Token list, line: int) =
    let toks = Array.ofList tokens
    let mutable pos = 0
    member _.Peek = if pos < toks.Length then toks.[pos].Tok else TEnd
    member _.PeekAt k = if pos + k < toks.Length then toks.[pos + k].Tok else TEnd
    member _.Line = if pos < toks.Length then toks.[pos].Line else line
    member p.Next() = let t = p.Peek in pos <- pos + 1; t
    member p.AtEnd = pos >= toks.Length
    member p.IsOp(o: string) = p.Peek = TOp o
    member p.IsName(n: string) = p.Peek = TName n
    member p.Fail(what: string) : 'a = fail "line %d: expected %s, got %s" p.Line what (describe p.Peek)
    member p.Expect(o: string) = if p.IsOp o then p.Next() |> ignore else p.Fail("'" + o + "'")
    member p.ExpectName(n: string) = if p.IsName n then p.Next() |> ignore else p.Fail("'" + n + "'")
    member p.Name() : string =
        match p.Next() with
        | TName n -> n
        | _ -> pos <- pos - 1; p.Fail "a name"
    member p.Done() = if not p.AtEnd then p.Fail "the end of the tag"

    member p.Expression() : Expr =
        let e = p.Or()
        if p.IsName "if" then
            p.Next() |> ignore
            let test = p.Or()
            let no = if p.IsName "else" then (p.Next() |> ignore; Some(p.Expression())) else None
            Cond(test, e, no)
        else e
    member p.Or() =
        let mutable e = p.And()
        while p.IsName "or" do
            p.Next() |> ignore
            e <- Or(e, p.And())
        e
    member p.And() =
        let mutable e = p.Not()
        while p.IsName "and" do
            p.Next() |> ignore
            e <- And(e, p.Not())
        e
    member p.Not() =
        if p.IsName "not" then (p.Next() |> ignore; Not(p.Not())) else p.Compare()
    member p.Compare() =
        let first = p.Sum()
        let rest = ResizeArray<string * Expr>()
        let mutable go = true
        while go do
            match p.Peek with
            | TOp("==" | "!=" | "<" | "<=" | ">" | ">=" as op) -> p.Next() |> ignore; rest.Add(op, p.Sum())
            | TName "in" -> p.Next() |> ignore; rest.Add("in", p.Sum())
            | TName "not" when p.PeekAt 1 = TName "in" -> p.Next() |> ignore; p.Next() |> ignore; rest.Add("not in", p.Sum())
            | _ -> go <- false
        if rest.Count = 0 then first else Compare(first, List.ofSeq rest)
    /// A left-associative chain of the binary operators `ops` over `operand` (as Jinja's parser loops).
    member p.Chain(ops: string list, operand: unit -> Expr) : Expr =
        let mutable e = operand ()
        while ops |> List.exists p.IsOp do
            let op = match p.Next() with TOp o -> o | t -> describe t
            e <- Binary(op, e, operand ())
        e
    member p.Sum() = p.Chain([ "+"; "-" ], p.Concat)
    member p.Concat() = p.Chain([ "~" ], p.Product)
    member p.Product() = p.Chain([ "*"; "/"; "//"; "%" ], p.Power)
    member p.Power() = p.Chain([ "**" ], p.Unary)
    member p.Unary() =
        if p.IsOp "-" then (p.Next() |> ignore; p.FilterOrTest(Neg(p.Postfix(p.Primary()))))
        elif p.IsOp "+" then (p.Next() |> ignore; p.FilterOrTest(p.Postfix(p.Primary())))
        else p.FilterOrTest(p.Postfix(p.Primary()))
    member p.Arguments() : Expr list * (string * Expr) list =
        p.Expect "("
        let args = ResizeArray<Expr>()
        let kwargs = ResizeArray<string * Expr>()
        while not (p.IsOp ")") do
            match p.Peek, p.PeekAt 1 with
            | TName k, TOp "=" -> p.Next() |> ignore; p.Next() |> ignore; kwargs.Add(k, p.Expression())
            | _ ->
                if kwargs.Count > 0 then p.Fail "a keyword argument (positional arguments come first)"
                args.Add(p.Expression())
            if not (p.IsOp ")") then p.Expect ","
        p.Expect ")"
        List.ofSeq args, List.ofSeq kwargs
    /// Filters (`| name(args)`) and tests (`is [not] name args`) applied to `e`, left to right.
    member p.FilterOrTest(e: Expr) : Expr =
        if p.IsOp "|" then
            p.Next() |> ignore
            let name = p.Name()
            let args, kwargs = if p.IsOp "(" then p.Arguments() else [], []
            p.FilterOrTest(p.Postfix(Filter(e, name, args, kwargs)))
        elif p.IsName "is" then
            p.Next() |> ignore
            let negated = if p.IsName "not" then (p.Next() |> ignore; true) else false
            let name =
                match p.Peek with
                | TOp("==" | "!=" | "<" | "<=" | ">" | ">=" as op) -> p.Next() |> ignore; op
                | _ -> p.Name()
            let args =
                if p.IsOp "(" then fst (p.Arguments())
                else
                    match p.Peek with
                    | TStr _ | TInt _ | TFloat _ -> [ p.Primary() ]
                    | TName n when not (List.contains n [ "and"; "or"; "else"; "if"; "not"; "in"; "is" ]) -> [ p.Postfix(p.Primary()) ]
                    | _ -> []
            p.FilterOrTest(Test(e, name, negated, args))
        else e
    /// Attributes (`.name`), subscripts and slices (`[i]`, `[a:b:c]`) and calls applied to `e`, left to right.
    member p.Postfix(e: Expr) : Expr =
        if p.IsOp "." then
            p.Next() |> ignore
            match p.Next() with
            | TName n -> p.Postfix(Attr(e, n))
            | TInt i -> p.Postfix(Index(e, Lit(Int i)))
            | _ -> pos <- pos - 1; p.Fail "an attribute name after '.'"
        elif p.IsOp "[" then
            p.Next() |> ignore
            let part () = if p.IsOp ":" || p.IsOp "]" then None else Some(p.Expression())
            let start = part ()
            if p.IsOp ":" then
                p.Next() |> ignore
                let stop = part ()
                let step = if p.IsOp ":" then (p.Next() |> ignore; part ()) else None
                p.Expect "]"
                p.Postfix(Slice(e, start, stop, step))
            else
                p.Expect "]"
                match start with
                | Some i -> p.Postfix(Index(e, i))
                | None -> p.Fail "an index"
        elif p.IsOp "(" then
            let args, kwargs = p.Arguments()
            p.Postfix(Call(e, args, kwargs))
        else e
    member p.Primary() : Expr =
        let l = p.Line
        match p.Next() with
        | TName("true" | "True") -> Lit(Bool true)
        | TName("false" | "False") -> Lit(Bool false)
        | TName("none" | "None") -> Lit Null
        | TName n -> Var n
        | TStr s ->
            let mutable s = s
            while (match p.Peek with TStr _ -> true | _ -> false) do
                match p.Next() with
                | TStr more -> s <- s + more
                | _ -> ()
            Lit(Str s)
        | TInt i -> Lit(Int i)
        | TFloat f -> Lit(Float f)
        | TOp "(" ->
            if p.IsOp ")" then (p.Next() |> ignore; ListLit [])
            else
                let first = p.Expression()
                if p.IsOp "," then
                    let items = ResizeArray [ first ]
                    while p.IsOp "," do
                        p.Next() |> ignore
                        if not (p.IsOp ")") then items.Add(p.Expression())
                    p.Expect ")"
                    ListLit(List.ofSeq items)
                else
                    p.Expect ")"
                    first
        | TOp "[" ->
            let items = ResizeArray<Expr>()
            while not (p.IsOp "]") do
                items.Add(p.Expression())
                if not (p.IsOp "]") then p.Expect ","
            p.Expect "]"
            ListLit(List.ofSeq items)
        | TOp "{" ->
            let items = ResizeArray<Expr * Expr>()
            while not (p.IsOp "}") do
                let k = p.Expression()
                p.Expect ":"
                items.Add(k, p.Expression())
                if not (p.IsOp "}") then p.Expect ","
            p.Expect "}"
            DictLit(List.ofSeq items)
        | t -> fail "line %d: expected a value, got %s" l (describe t)

/// Parses the pieces into nodes: statements nest until their `end...` tag.
let private parseNodes (pieces: Piece list) : Node list =
    let arr = Array.ofList pieces
    let mutable i = 0
    /// Reads nodes until a statement whose keyword is in `stops`; returns them and that statement's parser.
    let rec block (stops: string list) (opened: string) (openLine: int) : Node list * string * Parser =
        let nodes = ResizeArray<Node>()
        let mutable stop = None
        while stop.IsNone do
            if i >= arr.Length then
                if stops.IsEmpty then stop <- Some("", Parser([], 0))
                else fail "line %d: {%% %s %%} is never closed (expected %s)" openLine opened (String.Join(" or ", stops |> List.map (sprintf "{%% %s %%}")))
            else
                let piece = arr.[i]
                i <- i + 1
                match piece with
                | PText "" -> ()
                | PText t -> nodes.Add(Literal t)
                | PTag(Comment, _, _, _, _) -> ()
                | PTag(Output, tokens, _, _, line) ->
                    let p = Parser(tokens, line)
                    if p.AtEnd then fail "line %d: an empty {{ }}" line
                    let e = p.Expression()
                    p.Done()
                    nodes.Add(Print(e, line))
                | PTag(Statement, tokens, _, _, line) ->
                    let p = Parser(tokens, line)
                    let keyword = if p.AtEnd then fail "line %d: an empty {%% %%}" line else p.Name()
                    if List.contains keyword stops then stop <- Some(keyword, p)
                    else nodes.Add(statement keyword p line)
        let keyword, p = stop.Value
        List.ofSeq nodes, keyword, p
    and statement (keyword: string) (p: Parser) (line: int) : Node =
        match keyword with
        | "if" ->
            let branches = ResizeArray<Expr * Node list>()
            let mutable test = p.Expression()
            p.Done()
            let mutable otherwise = []
            let mutable go = true
            while go do
                let body, stop, q = block [ "elif"; "else"; "endif" ] "if" line
                branches.Add(test, body)
                match stop with
                | "elif" -> test <- q.Expression(); q.Done()
                | "else" ->
                    q.Done()
                    let body, _, q = block [ "endif" ] "if" line
                    q.Done()
                    otherwise <- body
                    go <- false
                | _ -> q.Done(); go <- false
            If(List.ofSeq branches, otherwise, line)
        | "for" ->
            let targets =
                let paren = p.IsOp "("
                if paren then p.Next() |> ignore
                let names = ResizeArray [ p.Name() ]
                while p.IsOp "," do
                    p.Next() |> ignore
                    names.Add(p.Name())
                if paren then p.Expect ")"
                List.ofSeq names
            p.ExpectName "in"
            let items = p.Or()
            let filter = if p.IsName "if" then (p.Next() |> ignore; Some(p.Or())) else None
            if p.IsName "recursive" then fail "line %d: unsupported construct: recursive for loops" line
            p.Done()
            let body, stop, q = block [ "else"; "endfor" ] "for" line
            q.Done()
            let otherwise =
                if stop = "else" then
                    let b, _, q = block [ "endfor" ] "for" line
                    q.Done()
                    b
                else []
            For(targets, items, filter, body, otherwise, line)
        | "set" ->
            let first = p.Name()
            if p.IsOp "." then
                p.Next() |> ignore
                let attr = p.Name()
                p.Expect "="
                let e = p.Expression()
                p.Done()
                Set(Attribute(first, attr), e, line)
            else
                let names = ResizeArray [ first ]
                while p.IsOp "," do
                    p.Next() |> ignore
                    names.Add(p.Name())
                if p.IsOp "=" then
                    p.Next() |> ignore
                    let e = p.Expression()
                    let e =
                        if p.IsOp "," then
                            let items = ResizeArray [ e ]
                            while p.IsOp "," do
                                p.Next() |> ignore
                                items.Add(p.Expression())
                            ListLit(List.ofSeq items)
                        else e
                    p.Done()
                    Set(Names(List.ofSeq names), e, line)
                elif names.Count = 1 && p.AtEnd then
                    let body, _, q = block [ "endset" ] "set" line
                    q.Done()
                    SetBlock(first, body, line)
                else p.Fail "'=' in {% set %}"
        | "break" -> p.Done(); Break line
        | "continue" -> p.Done(); Continue line
        | "generation" ->
            // transformers' own tag marking the assistant's tokens: its body renders as it is.
            p.Done()
            let body, _, q = block [ "endgeneration" ] "generation" line
            q.Done()
            If([ Lit(Bool true), body ], [], line)
        | k when unsupportedStatements.ContainsKey k ->
            fail "line %d: unsupported construct {%% %s %%} (%s are not part of the chat-template subset this interpreter runs)" line k unsupportedStatements.[k]
        | k -> fail "line %d: unknown or misplaced statement {%% %s %%}" line k
    let nodes, _, _ = block [] "" 0
    nodes


// ---------------------------------------------------------------------------------------------------------
// Evaluation

/// Python's strftime with English names (`%d %b %Y` and the other common codes; glibc's `%-d` unpadded forms).
let strftime (format: string) (t: DateTime) : string =
    let inv = CultureInfo.InvariantCulture
    let sb = StringBuilder()
    let mutable i = 0
    while i < format.Length do
        if format.[i] = '%' && i + 1 < format.Length then
            let unpadded = format.[i + 1] = '-' && i + 2 < format.Length
            let code = if unpadded then format.[i + 2] else format.[i + 1]
            let num (n: int) (width: int) = if unpadded then string n else n.ToString("D" + string width, inv)
            let text =
                match code with
                | 'd' -> num t.Day 2
                | 'm' -> num t.Month 2
                | 'Y' -> t.Year.ToString(inv)
                | 'y' -> num (t.Year % 100) 2
                | 'H' -> num t.Hour 2
                | 'I' -> num (if t.Hour % 12 = 0 then 12 else t.Hour % 12) 2
                | 'M' -> num t.Minute 2
                | 'S' -> num t.Second 2
                | 'j' -> num t.DayOfYear 3
                | 'p' -> if t.Hour < 12 then "AM" else "PM"
                | 'b' -> t.ToString("MMM", inv)
                | 'B' -> t.ToString("MMMM", inv)
                | 'a' -> t.ToString("ddd", inv)
                | 'A' -> t.ToString("dddd", inv)
                | '%' -> "%"
                | c -> fail "strftime_now: unsupported format code %%%c in %s" c (pyRepr format)
            sb.Append(text) |> ignore
            i <- i + (if unpadded then 3 else 2)
        else
            sb.Append(format.[i]) |> ignore
            i <- i + 1
    sb.ToString()

/// Python's truth value (an undefined value is false, as in Jinja).
let rec private truthy (v: Value) =
    match v with
    | Undefined _ | Null -> false
    | Bool b -> b
    | Int i -> i <> 0L
    | Float f -> f <> 0.0
    | Str s -> s <> ""
    | List xs -> not xs.IsEmpty
    | Dict kvs -> not kvs.IsEmpty
    | Namespace _ | Func _ -> true

let private number (v: Value) : float option =
    match v with
    | Int i -> Some(float i)
    | Float f -> Some f
    | Bool b -> Some(if b then 1.0 else 0.0)
    | _ -> None

/// Python's `==` (1 == 1.0 == True; undefined equals only undefined, as Jinja's Undefined does).
let rec private equal (a: Value) (b: Value) : bool =
    match a, b with
    | Undefined _, Undefined _ | Null, Null -> true
    | Str x, Str y -> x = y
    | List xs, List ys -> xs.Length = ys.Length && List.forall2 equal xs ys
    | Dict xs, Dict ys ->
        xs.Length = ys.Length && xs |> List.forall (fun (k, x) -> ys |> List.exists (fun (k2, y) -> k = k2 && equal x y))
    | Namespace x, Namespace y -> obj.ReferenceEquals(x, y)
    | _ ->
        match number a, number b with
        | Some x, Some y -> x = y
        | _ -> false

/// What a `for` loop runs over: a list's items, a dict's keys, a string's characters; nothing for an
/// undefined value (as Jinja's Undefined iterates).
let private items (what: string) (v: Value) : Value list =
    match v with
    | List xs -> xs
    | Dict kvs -> kvs |> List.map (fst >> Str)
    | Str s -> [ for c in s -> Str(string c) ]
    | Undefined _ -> []
    | Namespace d -> [ for kv in d -> Str kv.Key ]
    | _ -> fail "%s: a %s is not iterable" what (typeName v)

let private length (v: Value) : int =
    match v with
    | Str s -> s.Length
    | List xs -> xs.Length
    | Dict kvs -> kvs.Length
    | Undefined _ -> 0
    | _ -> fail "length: a %s has no length" (typeName v)

/// Python's slice indices for a sequence of length n.
let private sliceIndices (n: int) (start: int64 option) (stop: int64 option) (step: int64 option) : int list =
    let step = defaultArg step 1L
    if step = 0L then fail "slice step cannot be zero"
    let n = int64 n
    let clamp lo hi (x: int64) = max lo (min hi x)
    let norm (x: int64) = if x < 0L then x + n else x
    if step > 0L then
        let a = start |> Option.map (norm >> clamp 0L n) |> Option.defaultValue 0L
        let b = stop |> Option.map (norm >> clamp 0L n) |> Option.defaultValue n
        [ for k in a .. step .. b - 1L -> int k ]
    else
        let a = start |> Option.map (norm >> clamp -1L (n - 1L)) |> Option.defaultValue (n - 1L)
        let b = stop |> Option.map (norm >> clamp -1L (n - 1L)) |> Option.defaultValue -1L
        [ for k in a .. step .. b + 1L -> int k ]

let private asString (what: string) (v: Value) =
    match v with
    | Str s -> s
    | _ -> fail "%s: expected a string, got a %s" what (typeName v)

let private asInt (what: string) (v: Value) =
    match v with
    | Int i -> i
    | Bool b -> if b then 1L else 0L
    | _ -> fail "%s: expected an integer, got a %s" what (typeName v)

let private kwarg (name: string) (kwargs: (string * Value) list) = kwargs |> List.tryFind (fst >> (=) name) |> Option.map snd

/// Python's `str.strip`/`lstrip`/`rstrip` with optional characters.
let private strip (which: string) (s: string) (chars: Value option) =
    let cs = match chars with Some(Str c) -> Some(c.ToCharArray()) | Some Null | None -> None | Some v -> fail "%s: expected characters, got a %s" which (typeName v)
    match which, cs with
    | "lstrip", None -> s.TrimStart()
    | "rstrip", None -> s.TrimEnd()
    | _, None -> s.Trim()
    | "lstrip", Some c -> s.TrimStart c
    | "rstrip", Some c -> s.TrimEnd c
    | _, Some c -> s.Trim c

/// Python's `str.split(sep=None, maxsplit=-1)`.
let private split (s: string) (sep: Value option) (maxSplit: int) : Value =
    match sep with
    | None | Some Null ->
        let parts = ResizeArray<string>()
        let mutable rest = s.TrimStart()
        while rest <> "" do
            if maxSplit >= 0 && parts.Count = maxSplit then
                parts.Add rest
                rest <- ""
            else
                let k = rest |> Seq.tryFindIndex Char.IsWhiteSpace
                match k with
                | Some k -> parts.Add(rest.Substring(0, k)); rest <- rest.Substring(k).TrimStart()
                | None -> parts.Add rest; rest <- ""
        List [ for p in parts -> Str p ]
    | Some(Str "") -> fail "split: empty separator"
    | Some(Str sep) ->
        let parts = if maxSplit >= 0 then s.Split(sep, maxSplit + 1) else s.Split(sep)
        List [ for p in parts -> Str p ]
    | Some v -> fail "split: expected a string separator, got a %s" (typeName v)

/// Methods on strings and dicts that chat templates call (`.strip()`, `.startswith()`, `.items()`, ...).
let private method (receiver: Value) (name: string) : Value option =
    let fn f = Some(Func(name, f))
    let affix (test: string -> bool) (args: Value list) =
        match args with
        | [ Str p ] -> Bool(test p)
        | [ List ps ] -> Bool(ps |> List.exists (fun p -> test (asString name p)))
        | _ -> fail "%s: expected one string or a tuple of strings" name
    match receiver with
    | Str s ->
        match name with
        | "strip" | "lstrip" | "rstrip" -> fn (fun args _ -> Str(strip name s (List.tryHead args)))
        | "startswith" -> fn (fun args _ -> affix (fun p -> s.StartsWith(p, StringComparison.Ordinal)) args)
        | "endswith" -> fn (fun args _ -> affix (fun p -> s.EndsWith(p, StringComparison.Ordinal)) args)
        | "split" ->
            fn (fun args kwargs ->
                let sep = match args with x :: _ -> Some x | [] -> kwarg "sep" kwargs
                let maxSplit = match args with _ :: m :: _ -> Some m | _ -> kwarg "maxsplit" kwargs
                split s sep (maxSplit |> Option.map (asInt name >> int) |> Option.defaultValue -1))
        | "upper" -> fn (fun _ _ -> Str(s.ToUpperInvariant()))
        | "lower" -> fn (fun _ _ -> Str(s.ToLowerInvariant()))
        | "replace" ->
            fn (fun args _ ->
                match args with
                | [ Str a; Str b ] -> Str(s.Replace(a, b))
                | _ -> fail "replace: expected two strings")
        | "find" -> fn (fun args _ -> Int(int64 (s.IndexOf(asString name (List.head args), StringComparison.Ordinal))))
        | "count" ->
            fn (fun args _ ->
                match args with
                | [ Str "" ] -> Int(int64 (s.Length + 1))
                | [ Str p ] -> Int(int64 ((s.Length - s.Replace(p, "").Length) / p.Length))
                | _ -> fail "count: expected one string")
        | _ -> None
    | Dict kvs ->
        match name with
        | "items" -> fn (fun _ _ -> List [ for k, v in kvs -> List [ Str k; v ] ])
        | "keys" -> fn (fun _ _ -> List [ for k, _ in kvs -> Str k ])
        | "values" -> fn (fun _ _ -> List [ for _, v in kvs -> v ])
        | "get" ->
            fn (fun args _ ->
                match args with
                | [ Str k ] | [ Str k; _ ] ->
                    kvs |> List.tryFind (fst >> (=) k) |> Option.map snd |> Option.defaultValue (if args.Length = 2 then args.[1] else Null)
                | _ -> fail "get: expected a key and an optional default")
        | _ -> None
    | _ -> None

/// `x.name`: a dict's method, else its key; a namespace's attribute; a string's method; else undefined.
let private attribute (what: string) (v: Value) (name: string) : Value =
    match v with
    | Undefined u -> fail "%s is undefined (reading its attribute %s)" u name
    | Dict kvs ->
        match method v name with
        | Some m -> m
        | None -> kvs |> List.tryFind (fst >> (=) name) |> Option.map snd |> Option.defaultValue (Undefined what)
    | Namespace d -> match d.TryGetValue name with | true, x -> x | _ -> Undefined what
    | _ -> method v name |> Option.defaultValue (Undefined what)

/// `x[key]`: a list or string position (negative from the end), a dict key; undefined when absent.
let private index (what: string) (v: Value) (key: Value) : Value =
    match v, key with
    | Undefined u, _ -> fail "%s is undefined (reading an item of it)" u
    | List xs, (Int _ | Bool _) ->
        let i = asInt what key
        let i = if i < 0L then i + int64 xs.Length else i
        if i >= 0L && i < int64 xs.Length then xs.[int i] else Undefined what
    | Str s, Int i ->
        let i = if i < 0L then i + int64 s.Length else i
        if i >= 0L && i < int64 s.Length then Str(string s.[int i]) else Undefined what
    | Dict kvs, Str k -> kvs |> List.tryFind (fst >> (=) k) |> Option.map snd |> Option.defaultValue (Undefined what)
    | Namespace _, Str k -> attribute what v k
    | (Dict _ | Str _ | Namespace _), _ -> Undefined what
    | _ -> fail "%s: a %s cannot be indexed" what (typeName v)

/// Python's `+`: strings and lists concatenate, numbers add; an undefined operand fails, as in Jinja.
let private concat (what: string) (a: Value) (b: Value) : Value =
    match a, b with
    | Str x, Str y -> Str(x + y)
    | List x, List y -> List(x @ y)
    | (Int x, Int y) -> Int(x + y)
    | Undefined u, _ | _, Undefined u -> fail "%s is undefined (in %s)" u what
    | _ ->
        match number a, number b with
        | Some x, Some y -> Float(x + y)
        | _ -> fail "%s: cannot add a %s and a %s" what (typeName a) (typeName b)

/// Python's `- * / // % **` (floor division and modulo round toward minus infinity), and string repetition.
let private arithmetic (op: string) (a: Value) (b: Value) : Value =
    match a, b with
    | Str s, Int n | Int n, Str s when op = "*" -> Str(String.replicate (int (max 0L n)) s)
    | Undefined u, _ | _, Undefined u -> fail "%s is undefined (in an arithmetic %s)" u op
    | _ ->
    let isInt v = match v with Int _ | Bool _ -> true | _ -> false
    let bothInt = isInt a && isInt b
    match number a, number b with
    | Some x, Some y ->
        let floorDiv () = if y = 0.0 then fail "division by zero" else Math.Floor(x / y)
        match op with
        | "-" -> if bothInt then Int(int64 x - int64 y) else Float(x - y)
        | "*" -> if bothInt then Int(int64 x * int64 y) else Float(x * y)
        | "/" -> if y = 0.0 then fail "division by zero" else Float(x / y)
        | "//" -> if bothInt then Int(int64 (floorDiv ())) else Float(floorDiv ())
        | "%" ->
            if y = 0.0 then fail "modulo by zero"
            let r = x - y * Math.Floor(x / y)
            if bothInt then Int(int64 r) else Float r
        | "**" -> if bothInt && y >= 0.0 then Int(int64 (Math.Pow(x, y))) else Float(Math.Pow(x, y))
        | _ -> fail "unknown operator %s" op
    | _ ->
        match a with
        | Str _ when op = "%" -> fail "unsupported construct: Python %%-formatting of strings"
        | _ -> fail "cannot apply %s to a %s and a %s" op (typeName a) (typeName b)

/// Python's comparisons and membership (`in` a string is a substring test, `in` a dict a key test).
let private compare (op: string) (a: Value) (b: Value) : bool =
    match op with
    | "==" -> equal a b
    | "!=" -> not (equal a b)
    | "in" | "not in" ->
        let found =
            match b, a with
            | Str s, Str x -> s.Contains(x, StringComparison.Ordinal)
            | Str _, _ -> fail "'in <string>' needs a string on the left, got a %s" (typeName a)
            | List xs, _ -> xs |> List.exists (equal a)
            | Dict kvs, Str k -> kvs |> List.exists (fst >> (=) k)
            | Dict _, _ -> false
            | Undefined u, _ -> fail "%s is undefined (the right side of 'in')" u
            | _ -> fail "'in' needs a string, list or dict on the right, got a %s" (typeName b)
        if op = "in" then found else not found
    | _ ->
        let c =
            match a, b with
            | Str x, Str y -> String.CompareOrdinal(x, y)
            | _ ->
                match number a, number b with
                | Some x, Some y -> compare x y
                | _ -> fail "cannot compare a %s and a %s with %s" (typeName a) (typeName b) op
        match op with
        | "<" -> c < 0
        | "<=" -> c <= 0
        | ">" -> c > 0
        | _ -> c >= 0

/// Jinja's tests (`x is defined`, `x is string`, ...).
let private test (name: string) (v: Value) (args: Value list) : bool =
    let arg () = match args with [ a ] -> a | _ -> fail "test %s expects one argument" name
    match name with
    | "defined" -> (match v with Undefined _ -> false | _ -> true)
    | "undefined" -> (match v with Undefined _ -> true | _ -> false)
    | "none" -> (match v with Null -> true | _ -> false)
    | "boolean" -> (match v with Bool _ -> true | _ -> false)
    | "true" -> (match v with Bool true -> true | _ -> false)
    | "false" -> (match v with Bool false -> true | _ -> false)
    | "integer" -> (match v with Int _ -> true | _ -> false)
    | "float" -> (match v with Float _ -> true | _ -> false)
    | "number" -> (match v with Int _ | Float _ | Bool _ -> true | _ -> false)
    | "string" -> (match v with Str _ -> true | _ -> false)
    | "mapping" -> (match v with Dict _ -> true | _ -> false)
    | "iterable" -> (match v with Str _ | List _ | Dict _ | Undefined _ -> true | _ -> false)
    | "sequence" -> (match v with Str _ | List _ | Dict _ -> true | _ -> false)
    | "callable" -> (match v with Func _ -> true | _ -> false)
    | "lower" -> (match v with Str s -> s = s.ToLowerInvariant() | _ -> false)
    | "upper" -> (match v with Str s -> s = s.ToUpperInvariant() | _ -> false)
    | "even" -> asInt name v % 2L = 0L
    | "odd" -> asInt name v % 2L <> 0L
    | "divisibleby" -> asInt name v % asInt name (arg ()) = 0L
    | "eq" | "equalto" | "==" -> equal v (arg ())
    | "ne" | "!=" -> not (equal v (arg ()))
    | "lt" | "lessthan" | "<" -> compare "<" v (arg ())
    | "le" | "<=" -> compare "<=" v (arg ())
    | "gt" | "greaterthan" | ">" -> compare ">" v (arg ())
    | "ge" | ">=" -> compare ">=" v (arg ())
    | "in" -> compare "in" v (arg ())
    | "sameas" -> (match v, arg () with Null, Null | Undefined _, Undefined _ -> true | Bool x, Bool y -> x = y | a, b -> obj.ReferenceEquals(a, b))
    | _ -> fail "unsupported test '%s'" name

/// Jinja's filters that chat templates use, with transformers' `tojson`.
let rec private filter (name: string) (v: Value) (args: Value list) (kwargs: (string * Value) list) : Value =
    let opt (i: int) (key: string) = match List.tryItem i args with Some a -> Some a | None -> kwarg key kwargs
    let str () = match v with Str s -> s | _ -> toText v
    match name with
    | "trim" -> Str(strip "trim" (str ()) (opt 0 "chars"))
    | "upper" -> Str((str ()).ToUpperInvariant())
    | "lower" -> Str((str ()).ToLowerInvariant())
    | "capitalize" -> let s = str () in Str(if s = "" then s else string (Char.ToUpperInvariant s.[0]) + s.Substring(1).ToLowerInvariant())
    | "title" -> Str(CultureInfo.InvariantCulture.TextInfo.ToTitleCase((str ()).ToLowerInvariant()))
    | "string" -> Str(toText v)
    | "safe" -> v
    | "length" | "count" -> Int(int64 (length v))
    | "tojson" ->
        let indent = opt 0 "indent" |> Option.bind (function Null -> None | i -> Some(int (asInt "tojson indent" i)))
        let separators =
            kwarg "separators" kwargs |> Option.bind (function
                | List [ Str a; Str b ] -> Some(a, b)
                | Null -> None
                | _ -> fail "tojson: separators must be two strings")
        let sortKeys = kwarg "sort_keys" kwargs |> Option.map truthy |> Option.defaultValue false
        match kwarg "ensure_ascii" kwargs with
        | Some x when truthy x -> fail "unsupported construct: tojson(ensure_ascii=true)"
        | _ -> ()
        Str(toJson indent separators sortKeys v)
    | "default" | "d" ->
        let fallback = opt 0 "default_value" |> Option.defaultValue (Str "")
        let boolean = opt 1 "boolean" |> Option.map truthy |> Option.defaultValue false
        match v with
        | Undefined _ -> fallback
        | _ when boolean && not (truthy v) -> fallback
        | _ -> v
    | "items" ->
        match v with
        | Dict kvs -> List [ for k, x in kvs -> List [ Str k; x ] ]
        | Undefined _ -> List []
        | _ -> fail "items: expected a dict, got a %s" (typeName v)
    | "list" -> List(items "list" v)
    | "first" -> items "first" v |> List.tryHead |> Option.defaultValue (Undefined "first of an empty sequence")
    | "last" -> items "last" v |> List.tryLast |> Option.defaultValue (Undefined "last of an empty sequence")
    | "reverse" -> (match v with Str s -> Str(String(Array.rev (s.ToCharArray()))) | _ -> List(List.rev (items "reverse" v)))
    | "join" ->
        let sep = opt 0 "d" |> Option.map (asString "join") |> Option.defaultValue ""
        let xs = items "join" v
        let xs = match opt 1 "attribute" with Some(Str a) -> xs |> List.map (fun x -> attribute a x a) | _ -> xs
        Str(String.Join(sep, xs |> List.map toText))
    | "replace" ->
        match args with
        | [ Str a; Str b ] -> Str((str ()).Replace(a, b))
        | _ -> fail "replace: expected two strings"
    | "int" -> (match v with Int _ -> v | Float f -> Int(int64 f) | Bool b -> Int(if b then 1L else 0L) | Str s -> (match Int64.TryParse(s.Trim()) with | true, i -> Int i | _ -> Int 0L) | _ -> Int 0L)
    | "float" -> (match number v with Some f -> Float f | None -> (match v with Str s -> (match Double.TryParse(s.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture) with | true, f -> Float f | _ -> Float 0.0) | _ -> Float 0.0))
    | "abs" -> (match v with Int i -> Int(abs i) | Float f -> Float(abs f) | _ -> fail "abs: expected a number, got a %s" (typeName v))
    | "map" ->
        match kwarg "attribute" kwargs, args with
        | Some(Str a), [] -> List(items "map" v |> List.map (fun x -> attribute a x a))
        | None, Str f :: rest -> List(items "map" v |> List.map (fun x -> filter f x rest []))
        | _ -> fail "map: expected attribute='name' or a filter name"
    | "selectattr" | "rejectattr" ->
        match args with
        | Str a :: rest ->
            let keep (x: Value) =
                let value = attribute a x a
                let ok = match rest with [] -> truthy value | Str t :: targs -> test t value targs | _ -> fail "%s: expected a test name" name
                if name = "selectattr" then ok else not ok
            List(items name v |> List.filter keep)
        | _ -> fail "%s: expected an attribute name" name
    | "select" | "reject" ->
        let keep (x: Value) =
            let ok = match args with [] -> truthy x | Str t :: targs -> test t x targs | _ -> fail "%s: expected a test name" name
            if name = "select" then ok else not ok
        List(items name v |> List.filter keep)
    | _ -> fail "unsupported filter '%s'" name

/// Renders with Jinja's scoping: a for loop's body is its own scope (a `set` inside does not leak out), `if` is not.
type private Renderer(now: unit -> DateTime) =
    let scopes = Stack<Dictionary<string, Value>>()
    let out = StringBuilder()
    let mutable line = 0
    let globals =
        dict [
            "raise_exception", Func("raise_exception", fun args _ ->
                raise (TemplateError(sprintf "the chat template raised an exception: %s" (args |> List.map toText |> String.concat " "))))
            "strftime_now", Func("strftime_now", fun args _ ->
                match args with
                | [ Str f ] -> Str(strftime f (now ()))
                | _ -> fail "strftime_now: expected one format string")
            "namespace", Func("namespace", fun args kwargs ->
                let d = Dictionary<string, Value>()
                for a in args do
                    match a with
                    | Dict kvs -> for k, x in kvs do d.[k] <- x
                    | _ -> fail "namespace: positional arguments must be dicts"
                for k, x in kwargs do d.[k] <- x
                Namespace d)
            "range", Func("range", fun args _ ->
                let ints = args |> List.map (asInt "range")
                let a, b, s =
                    match ints with
                    | [ n ] -> 0L, n, 1L
                    | [ a; b ] -> a, b, 1L
                    | [ a; b; s ] when s <> 0L -> a, b, s
                    | _ -> fail "range: expected 1 to 3 integers (step not 0)"
                List [ for k in a .. s .. (if s > 0L then b - 1L else b + 1L) -> Int k ])
            "dict", Func("dict", fun _ kwargs -> Dict kwargs) ]

    member _.Push(vars: (string * Value) seq) =
        let d = Dictionary<string, Value>()
        for k, v in vars do d.[k] <- v
        scopes.Push d
    member _.Pop() = scopes.Pop() |> ignore
    member _.Lookup(name: string) : Value =
        let found = scopes |> Seq.tryPick (fun d -> match d.TryGetValue name with | true, v -> Some v | _ -> None)
        match found with
        | Some v -> v
        | None -> match globals.TryGetValue name with | true, v -> v | _ -> Undefined name
    member _.Assign(name: string, v: Value) = scopes.Peek().[name] <- v
    member _.Text = out.ToString()
    member _.Line = line

    member r.Eval(e: Expr) : Value =
        match e with
        | Lit v -> v
        | Var n -> r.Lookup n
        | Attr(x, n) -> attribute (sprintf "%s.%s" (r.Describe x) n) (r.Eval x) n
        | Index(x, k) -> index (sprintf "%s[...]" (r.Describe x)) (r.Eval x) (r.Eval k)
        | Slice(x, a, b, s) ->
            let bound = Option.map (r.Eval >> function Null -> None | v -> Some(asInt "slice" v)) >> Option.flatten
            match r.Eval x with
            | List xs -> let arr = Array.ofList xs in List [ for k in sliceIndices arr.Length (bound a) (bound b) (bound s) -> arr.[k] ]
            | Str str -> Str(String([| for k in sliceIndices str.Length (bound a) (bound b) (bound s) -> str.[k] |]))
            | Undefined u -> fail "%s is undefined (slicing it)" u
            | v -> fail "cannot slice a %s" (typeName v)
        | Call(f, args, kwargs) ->
            let args = args |> List.map r.Eval
            let kwargs = kwargs |> List.map (fun (k, x) -> k, r.Eval x)
            match r.Eval f with
            | Func(_, call) -> call args kwargs
            | Undefined u -> fail "unsupported or undefined function or method: %s" u
            | v -> fail "%s is a %s, not a function" (r.Describe f) (typeName v)
        | Filter(x, name, args, kwargs) ->
            filter name (r.Eval x) (args |> List.map r.Eval) (kwargs |> List.map (fun (k, a) -> k, r.Eval a))
        | Test(x, name, negated, args) ->
            let ok = test name (r.Eval x) (args |> List.map r.Eval)
            Bool(if negated then not ok else ok)
        | Not x -> Bool(not (truthy (r.Eval x)))
        | Neg x ->
            match r.Eval x with
            | Int i -> Int(-i)
            | Float f -> Float(-f)
            | v -> fail "cannot negate a %s" (typeName v)
        | And(a, b) -> let x = r.Eval a in if truthy x then r.Eval b else x
        | Or(a, b) -> let x = r.Eval a in if truthy x then x else r.Eval b
        | Binary("+", a, b) -> concat "+" (r.Eval a) (r.Eval b)
        | Binary("~", a, b) -> Str(toText (r.Eval a) + toText (r.Eval b))
        | Binary(op, a, b) -> arithmetic op (r.Eval a) (r.Eval b)
        | Compare(first, rest) ->
            let mutable left = r.Eval first
            let mutable ok = true
            for op, x in rest do
                if ok then
                    let right = r.Eval x
                    ok <- compare op left right
                    left <- right
            Bool ok
        | Cond(t, yes, no) ->
            if truthy (r.Eval t) then r.Eval yes
            else match no with Some n -> r.Eval n | None -> Undefined "a conditional expression without else"
        | ListLit xs -> List(xs |> List.map r.Eval)
        | DictLit kvs -> Dict(kvs |> List.map (fun (k, v) -> asString "dict key" (r.Eval k), r.Eval v))

    /// The expression as the template wrote it, roughly, for error messages.
    member r.Describe(e: Expr) : string =
        match e with
        | Var n -> n
        | Attr(x, n) -> r.Describe x + "." + n
        | Index(x, Lit k) -> sprintf "%s[%s]" (r.Describe x) (repr k)
        | Index(x, _) | Slice(x, _, _, _) -> r.Describe x + "[...]"
        | Call(f, _, _) -> r.Describe f + "(...)"
        | Lit v -> repr v
        | _ -> "an expression"

    /// Runs the nodes; returns "break" or "continue" when a loop control ends them early.
    member r.Run(nodes: Node list) : string option =
        let mutable control = None
        let mutable rest = nodes
        while control.IsNone && not rest.IsEmpty do
            control <- r.Exec rest.Head
            rest <- rest.Tail
        control

    member r.Exec(node: Node) : string option =
        match node with
        | Literal t -> out.Append(t) |> ignore; None
        | Print(e, l) -> line <- l; out.Append(toText (r.Eval e)) |> ignore; None
        | If(branches, otherwise, l) ->
            line <- l
            match branches |> List.tryFind (fun (t, _) -> line <- l; truthy (r.Eval t)) with
            | Some(_, body) -> r.Run body
            | None -> r.Run otherwise
        | Set(target, e, l) ->
            line <- l
            let v = r.Eval e
            match target with
            | Names [ n ] -> r.Assign(n, v)
            | Names ns ->
                let vs = items "set" v
                if vs.Length <> ns.Length then fail "set: cannot unpack %d values into %d names" vs.Length ns.Length
                List.iter2 (fun n x -> r.Assign(n, x)) ns vs
            | Attribute(n, a) ->
                match r.Lookup n with
                | Namespace d -> d.[a] <- v
                | x -> fail "set %s.%s: attributes can only be set on a namespace(), %s is a %s" n a n (typeName x)
            None
        | SetBlock(n, body, l) ->
            line <- l
            let start = out.Length
            r.Run body |> ignore
            let text = out.ToString(start, out.Length - start)
            out.Length <- start
            r.Assign(n, Str text)
            None
        | Break l -> line <- l; Some "break"
        | Continue l -> line <- l; Some "continue"
        | For(targets, source, cond, body, otherwise, l) ->
            line <- l
            let all = items (sprintf "for ... in %s" (r.Describe source)) (r.Eval source)
            let bind (x: Value) =
                match targets with
                | [ t ] -> [ t, x ]
                | ts ->
                    let xs = items "for" x
                    if xs.Length <> ts.Length then fail "for: cannot unpack %d values into %d names" xs.Length ts.Length
                    List.zip ts xs
            let kept =
                match cond with
                | None -> all
                | Some c ->
                    all |> List.filter (fun x ->
                        r.Push(bind x)
                        try truthy (r.Eval c) finally r.Pop())
            let arr = Array.ofList kept
            if arr.Length = 0 then r.Run otherwise |> ignore
            else
                let mutable stop = false
                let mutable k = 0
                while not stop && k < arr.Length do
                    let n = arr.Length
                    let loop =
                        Dict [ "index", Int(int64 (k + 1)); "index0", Int(int64 k); "revindex", Int(int64 (n - k))
                               "revindex0", Int(int64 (n - k - 1)); "first", Bool(k = 0); "last", Bool(k = n - 1)
                               "length", Int(int64 n)
                               "previtem", (if k > 0 then arr.[k - 1] else Undefined "loop.previtem")
                               "nextitem", (if k < n - 1 then arr.[k + 1] else Undefined "loop.nextitem")
                               "cycle", Func("loop.cycle", fun args _ ->
                                   if args.IsEmpty then fail "loop.cycle: expected at least one value"
                                   args.[k % args.Length]) ]
                    r.Push(("loop", loop) :: bind arr.[k])
                    let control = try r.Run body finally r.Pop()
                    if control = Some "break" then stop <- true
                    k <- k + 1
            None


// ---------------------------------------------------------------------------------------------------------
// Templates, folders and rendering

/// A parsed chat template with the special tokens of its tokenizer (`bos_token`, `eos_token`, ...), which
/// `transformers` passes to every render.
type ChatTemplate internal (source: string, text: string, specialTokens: (string * Value) list, nodes: Node list) =
    /// Where the template came from (a tokenizer_config.json, with the template's name if it has several).
    member _.Source = source
    /// The template's Jinja text.
    member _.Text = text
    member _.SpecialTokens = specialTokens
    member internal _.Nodes = nodes

/// Rendering options (`apply_chat_template`'s arguments).
type Options =
    { AddGenerationPrompt: bool
      /// `tools`: JSON schemas of functions, or None (the template sees `tools` = none).
      Tools: Value list option
      /// `documents` for retrieval-augmented templates, or None.
      Documents: Value list option
      /// Extra template variables (`date_string`, ...); they override the special tokens.
      Variables: (string * Value) list
      /// The clock `strftime_now` reads; None: the local time now, as `transformers` does.
      Now: DateTime option }

/// `apply_chat_template(..., add_generation_prompt=True)` with no tools, documents or extra variables, and the
/// local clock.
let defaults : Options =
    { AddGenerationPrompt = true; Tools = None; Documents = None; Variables = []; Now = None }

/// Parses a template's text (`source` names it in errors); special tokens as given.
let parse (source: string) (specialTokens: (string * Value) list) (text: string) : ChatTemplate =
    let nodes =
        try lex text |> controlWhitespace |> parseNodes
        with TemplateError msg -> failwithf "chat template %s: %s" source msg
    ChatTemplate(source, text, specialTokens, nodes)

/// The tokenizer's special tokens as `transformers`' `special_tokens_map` gives them to templates.
let private specialTokensOf (dir: string) : (string * Value) list =
    let settings = HfTokenizer.readSettings dir
    [ for KeyValue(role, token) in settings.Specials -> role, Str token ]
    @ (if settings.AdditionalSpecial.IsEmpty then [] else [ "additional_special_tokens", List(settings.AdditionalSpecial |> List.map Str) ])

/// The folder's chat template by name: tokenizer_config.json's `chat_template` (a string, or a list of
/// `{"name", "template"}` of which `name` is taken), else a `chat_template.jinja` file.
let fromFolderNamed (dir: string) (name: string option) : ChatTemplate =
    let configFile = Path.Combine(dir, "tokenizer_config.json")
    let jinjaFile = Path.Combine(dir, "chat_template.jinja")
    let fromConfig =
        if File.Exists configFile then
            use doc =
                try JsonDocument.Parse(File.ReadAllText configFile)
                with :? JsonException as e -> failwithf "%s: not valid JSON: %s" configFile e.Message
            match doc.RootElement.TryGetProperty "chat_template" with
            | true, t when t.ValueKind = JsonValueKind.String -> Some(configFile, t.GetString())
            | true, t when t.ValueKind = JsonValueKind.Array ->
                let named =
                    [ for x in t.EnumerateArray() do
                          match x.TryGetProperty "name", x.TryGetProperty "template" with
                          | (true, n), (true, tt) when n.ValueKind = JsonValueKind.String && tt.ValueKind = JsonValueKind.String ->
                              n.GetString(), tt.GetString()
                          | _ -> failwithf "%s: chat_template: expected a list of {\"name\": ..., \"template\": ...}, got %s" configFile (x.GetRawText()) ]
                let wanted = defaultArg name "default"
                match named |> List.tryFind (fst >> (=) wanted) with
                | Some(n, text) -> Some(sprintf "%s (template \"%s\")" configFile n, text)
                | None ->
                    failwithf "%s: no chat template named \"%s\" (it has %s)" configFile wanted
                        (String.Join(", ", named |> List.map fst))
            | true, t when t.ValueKind <> JsonValueKind.Null ->
                failwithf "%s: chat_template: expected a string or a list of named templates, got %s" configFile (t.ValueKind.ToString())
            | _ -> None
        else None
    let source, text =
        match fromConfig with
        | Some st -> st
        | None when File.Exists jinjaFile -> jinjaFile, File.ReadAllText jinjaFile
        | None -> failwithf "%s has no chat template: looked for tokenizer_config.json's \"chat_template\" and chat_template.jinja" dir
    let specials = if File.Exists configFile then specialTokensOf dir else []
    parse source specials text

/// The folder's chat template (the one named "default" where tokenizer_config.json lists several).
let fromFolder (dir: string) : ChatTemplate = fromFolderNamed dir None

/// Renders the template for messages given as values (dicts with `role`, `content` and, for tool use,
/// `tool_calls`), as `apply_chat_template(messages, tokenize=False, ...)` does.
let renderMessages (template: ChatTemplate) (messages: Value list) (options: Options) : string =
    let nodes = template.Nodes
    let r = Renderer(fun () -> defaultArg options.Now DateTime.Now)
    let listOrNone = function Some xs -> List xs | None -> Null
    r.Push(
        template.SpecialTokens
        @ options.Variables
        @ [ "messages", List messages; "tools", listOrNone options.Tools; "documents", listOrNone options.Documents
            "add_generation_prompt", Bool options.AddGenerationPrompt ])
    try
        r.Run nodes |> ignore
        r.Text
    with
    | TemplateError msg when msg.StartsWith "the chat template raised" -> failwithf "chat template %s, line %d: %s" template.Source r.Line msg
    | TemplateError msg when msg.StartsWith "line " -> failwithf "chat template %s, %s" template.Source msg
    | TemplateError msg -> failwithf "chat template %s, line %d: %s" template.Source r.Line msg

/// Renders the template for `(role, content)` messages.
let render (template: ChatTemplate) (messages: (string * string) list) (options: Options) : string =
    renderMessages template (messages |> List.map message) options

/// The conversation's token ids as `apply_chat_template(messages, tokenize=True, ...)` gives them: the rendered
/// text tokenized without adding special tokens (the template writes them).
let applyChatTemplate (tokenizer: HfTokenizer.HfTokenizer) (template: ChatTemplate) (messages: (string * string) list) (options: Options) : int[] =
    tokenizer.Encode(render template messages options, false)
