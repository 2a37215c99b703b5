"""Module-level structure classes bound with ``self.define(cls)``, annotations as fields
(issue 15, item 5)."""

import os
import sys

import pytest

from permastruct import Int, List, SchemaError, Storage, String, Structure

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import typed_schema_example  # noqa: E402


class Author(Structure):
    """A writer."""

    name: String
    born: Int

    def label(self):
        return f"{self.name} ({self.born})"

    @property
    def century(self):
        return self.born // 100 + 1


class Book(Structure):
    title = String
    author = Author  # a module-level class as a field type
    pages: Int
    sequel = "Book"


class Novel(Book):
    genre: String


class Library(Storage):
    def populateSchema(self):
        self.define(Author)
        self.define(Novel)  # binds Book too (its base)
        self.define(List("Shelf")[Book])

        class Essay(Book):  # a storage's own class derived from a module-level one
            topic = self.schema.String

        class Root(self.schema.Structure):
            shelf = self.schema.Shelf
            favourite = Author


def fill(p):
    orwell = p.schema.Author(name="George Orwell", born=1903)
    p.root.favourite = orwell
    p.root.shelf = [p.schema.Novel(title="1984", author=orwell, pages=328, genre="dystopia"),
                    p.schema.Essay(title="Politics and the English Language", author=orwell, topic="prose")]
    p.root.shelf[1].sequel = p.root.shelf[0]


def test_bound_classes_are_subclasses_of_the_module_level_ones(tmp_path):
    with Library(tmp_path / "a.ps") as a, Library(tmp_path / "b.ps") as b:
        fill(a)
        fill(b)
        for p in (a, b):
            s = p.schema
            assert issubclass(s.Author, Author) and issubclass(s.Novel, Novel) and issubclass(s.Novel, s.Book)
            assert issubclass(s.Essay, Book) and issubclass(s.Essay, s.Book)
            orwell = p.root.favourite
            assert isinstance(orwell, Author) and orwell.label() == "George Orwell (1903)"
            assert orwell.century == 20
            novel, essay = p.root.shelf
            assert isinstance(novel, Novel) and isinstance(novel, Book) and isinstance(essay, Book)
            assert novel.author.isSameAs(orwell) and essay.sequel.isSameAs(novel) and novel.genre == "dystopia"
            # (fields only annotated come first: a class body does not say where they were among the others)
            assert list(s.Book._ps_field_types) == ["pages", "title", "author", "sequel"]
            assert s.Book._ps_field_types["author"] is s.Author and s.Book._ps_field_types["sequel"] is s.Book
            assert s.Author.__doc__.startswith("A writer.")
            p.check()
        assert a.schema.Author is not b.schema.Author
        with pytest.raises(ValueError, match="Root.favourite: .* belongs to <Library"):
            a.root.favourite = b.root.favourite  # (another storage's: refused)


def test_reopened_bound_and_bare(tmp_path):
    path = tmp_path / "a.ps"
    with Library(path) as p:
        fill(p)
    with Library(path) as p:
        assert p.root.favourite.label() == "George Orwell (1903)" and p.root.shelf[0].pages == 328
        p.check()
    with Storage(path) as p:
        assert str(p.root.shelf[1].topic) == "prose" and p.root.shelf[1].sequel.title == "1984"
        p.check()


def test_module_level_classes_cannot_be_used_unbound():
    with pytest.raises(TypeError, match=r"bind it to a storage with self.define\(Author\)"):
        Author(name="x")
    p = Library(None)
    try:
        with pytest.raises(SchemaError, match=r"define it with self.define\(Person\) inside"):
            p.define(typed_schema_example.Person)
    finally:
        p.close()


def test_mistakes_in_module_level_classes_are_caught_when_the_class_is_created():
    with pytest.raises(SchemaError, match="Bad.name = str is not a field type: write String"):
        class Bad(Structure):
            name = str
    with pytest.raises(SchemaError, match="Hinted.tags = list.* type hint"):
        class Hinted(Structure):
            tags: list[str]
    p = Library(None)
    try:
        with pytest.raises(SchemaError, match="must derive from Structure or from another module-level"):
            class Derived(p.schema.Author):
                pass
    finally:
        p.close()


def test_annotations_in_a_populate_schema_class_and_class_vars(tmp_path):
    from typing import ClassVar

    class Annotated(Storage):
        def populateSchema(self):
            class Root(self.schema.Structure):
                count: Int
                name: String
                LIMIT: ClassVar[int] = 10
                note = "Root"  # a name in quotes: the type itself

    with Annotated(tmp_path / "n.ps") as p:
        assert list(p.schema.Root._ps_field_types) == ["count", "name", "note"]
        p.root.count, p.root.name = 3, "x"
        assert (p.root.count, p.root.name, p.root.LIMIT) == (3, "x", 10)
        p.check()


def test_future_annotations_module(tmp_path):
    Members = typed_schema_example.Members
    path = tmp_path / "m.ps"
    with Members(path) as p:
        ann = p.schema.Person(name="Ann", age=30)
        ann.friend = ann
        p.root.people = [ann, p.schema.Person(name="Bob", age=12, friend=ann)]
        assert typed_schema_example.ages(p) == 42
        assert p.schema.Person._ps_field_types["friend"] is p.schema.Person
        assert p.schema.Person._ps_field_types["age"] is Int
        assert isinstance(ann, typed_schema_example.Person) and ann.greeting() == "Hello, Ann"
        p.check()
    with Members(path) as p:
        assert p.root.people[1].friend.name == "Ann"


def test_evolution_of_a_module_level_class(tmp_path):
    path = tmp_path / "a.ps"
    with Library(path) as p:
        fill(p)
    AuthorV2 = type("Author", (Structure,), {"__module__": __name__, "__annotations__": {
        "name": String, "born": Int, "died": Int}})

    class LibraryV2(Storage):
        def populateSchema(self):
            self.define(AuthorV2)
            Library.populateSchema(self)  # Author is AuthorV2 here, so Book's author field names it

    with pytest.raises(SchemaError, match="the schema already has a type named 'Author'"):
        LibraryV2(path)

    class LibraryV3(Storage):
        def populateSchema(self):
            bound = self.define(AuthorV2)
            class Root(self.schema.Structure):
                shelf = List("Shelf")["Book"]
                favourite = bound
            class Book(self.schema.Structure):
                title = self.schema.String
                author = bound
                pages = self.schema.Int
                sequel = "Book"
            class Novel(Book):
                genre = self.schema.String
            class Essay(Book):
                topic = self.schema.String

    with LibraryV3(path) as p:
        orwell = p.root.favourite
        assert (orwell.name, orwell.born, orwell.died) == ("George Orwell", 1903, 0)
        orwell.died = 1950
        assert isinstance(orwell, AuthorV2)
        p.check()
    with LibraryV3(path) as p:
        assert p.root.shelf[0].author.died == 1950
