"""The dock widget: rank source models and select tiles on the open image, shown in place.

``RankSelectWidget(viewer)`` holds: the image layer to work on, the zoo (a folder of model packages; empty = the
bundled zoo), the tile size, the number of ranking tiles, the pool and the number of tiles to select. *Rank
sources* runs :func:`neuroadda_rt.rank_sources` and fills the table (MMD², p-value; most transferable first);
*Select tiles* runs :func:`neuroadda_rt.select_tiles` with the chosen source (the table's selected row, else the
best) and outlines the chosen tiles on the image (yellow, numbered, with their uncertainty) over the scored pool
(blue); *Write hand-off* writes the annotation folder that the plugin's reader opens for proofreading.
Work runs in the GUI thread (the widget is busy meanwhile); each step also exists as a method for scripts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtWidgets import (QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QSpinBox, QTableWidget,
                            QTableWidgetItem, QVBoxLayout, QWidget, QComboBox, QAbstractItemView)

from ..errors import NeuroaddaError


class RankSelectWidget(QWidget):
    """Rank sources and select tiles to annotate on an image layer of ``napari_viewer``."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.ranking = None
        self.selection = None
        self.layer_combo = QComboBox()
        self.zoo_edit = QLineEdit()
        self.zoo_edit.setPlaceholderText("zoo folder (empty: the bundled zoo)")
        self.tile_spin = self._spin(16, 4096, 128)
        self.ntiles_spin = self._spin(4, 4096, 64)
        self.pool_spin = self._spin(1, 100000, 256)
        self.n_spin = self._spin(1, 256, 4)
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("annotation folder to write")
        self.rank_button = QPushButton("Rank sources")
        self.select_button = QPushButton("Select tiles")
        self.write_button = QPushButton("Write hand-off")
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["source", "MMD²", "p", "modality"])
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.status = QLabel("open an EM image, then rank sources")
        self.setMinimumWidth(380)
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("image", self.layer_combo)
        form.addRow("zoo", self.zoo_edit)
        form.addRow("tile size", self.tile_spin)
        form.addRow("ranking tiles", self.ntiles_spin)
        form.addRow("pool", self.pool_spin)
        form.addRow("tiles to annotate", self.n_spin)
        buttons = QHBoxLayout()
        for b in (self.rank_button, self.select_button):
            buttons.addWidget(b)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit)
        out_row.addWidget(self.write_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.table)
        layout.addLayout(out_row)
        layout.addWidget(self.status)

        self.rank_button.clicked.connect(lambda: self._guard(self.rank))
        self.select_button.clicked.connect(lambda: self._guard(self.select))
        self.write_button.clicked.connect(lambda: self._guard(lambda: self.write_handoff(self.out_edit.text())))
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    @staticmethod
    def _spin(lo: int, hi: int, value: int) -> QSpinBox:
        s = QSpinBox()
        s.setRange(lo, hi)
        s.setValue(value)
        return s

    def _guard(self, fn) -> None:
        """Run a step from a button: errors go to the status line (one line, as on the command line)."""
        try:
            fn()
        except (NeuroaddaError, OSError, ValueError) as exc:
            self.status.setText(f"error: {exc}")

    def _refresh_layers(self, *_) -> None:
        from napari.layers import Image

        current = self.layer_combo.currentText()
        self.layer_combo.clear()
        names = [ly.name for ly in self.viewer.layers if isinstance(ly, Image)]
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)

    # -- the steps --------------------------------------------------------------------------------
    def image_layer(self):
        name = self.layer_combo.currentText()
        if not name:
            raise ValueError("expected an image layer to work on, got none (open an EM volume first)")
        return self.viewer.layers[name]

    def _target(self):
        """The layer's file when it was opened from one (read lazily), else its data."""
        layer = self.image_layer()
        path = (layer.metadata or {}).get("path")
        key = (layer.metadata or {}).get("key")
        if path and Path(path).exists():
            from ..io import open_volume

            return open_volume(path, key=key) if key else open_volume(path)
        return np.asarray(layer.data)

    def _zoo(self):
        from ..package import Zoo, default_zoo

        text = self.zoo_edit.text().strip()
        return Zoo(text) if text else default_zoo()

    def rank(self):
        """Rank the zoo's sources on the image; fills the table. Returns the SourceRanking."""
        from ..ranking import rank_sources

        self.status.setText("ranking sources ...")
        self.ranking = rank_sources(self._target(), self._zoo(), n_tiles=self.ntiles_spin.value(),
                                    tile_size=self.tile_spin.value(), n_permutations=100)
        entries = list(self.ranking)
        self.table.setRowCount(len(entries))
        for r, e in enumerate(entries):
            modality = getattr(e.model, "modality", None) if e.model is not None else None
            for c, v in enumerate((e.name, f"{e.mmd2:.4g}", f"{e.p_value:.3g}", modality or "")):
                self.table.setItem(r, c, QTableWidgetItem(v))
        self.table.resizeColumnsToContents()
        if entries:
            self.table.selectRow(0)
        self.status.setText(f"ranked {len(entries)} sources; best: {entries[0].name}" if entries else
                            "the zoo holds no source")
        return self.ranking

    def chosen_source(self):
        """The source the table's selected row names (default: the best-ranked one)."""
        if self.ranking is None:
            self.rank()
        entries = list(self.ranking)
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        i = rows[0].row() if rows else 0
        e = entries[i]
        return e.model if e.model is not None else e.path

    def select(self):
        """Select tiles with the chosen source and outline them on the image. Returns the TileSelection."""
        from ..selection import select_tiles

        self.status.setText("scoring the pool ...")
        self.selection = sel = select_tiles(self._target(), self.chosen_source(), self.n_spin.value(),
                                            pool=self.pool_spin.value(), tile_size=self.tile_spin.value())
        layer = self.image_layer()
        size = int(sel.tile_size)

        def boxes(coords):
            out = []
            for c in np.asarray(coords):
                *z, y, x = (float(v) for v in c)
                corners = [[y, x], [y, x + size], [y + size, x + size], [y + size, x]]
                out.append(np.array([[*z, *p] for p in corners]))
            return out

        for name in ("candidate pool", "selected tiles"):
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        scale = layer.scale[-np.asarray(sel.coords).shape[1]:]
        self.viewer.add_shapes(boxes(sel.pool_coords), shape_type="rectangle", edge_color="#35b6ff", edge_width=2,
                               face_color="transparent", name="candidate pool", scale=scale, opacity=0.55)
        labels = [f"tile {i}" for i in range(len(sel))]
        self.viewer.add_shapes(boxes(sel.coords), shape_type="rectangle", edge_color="yellow", edge_width=4,
                               face_color="transparent", name="selected tiles", scale=scale,
                               properties={"label": labels},
                               text={"string": "{label}", "color": "yellow", "size": 9, "anchor": "upper_left"})
        first = np.asarray(sel.coords)[0]
        if len(first) == 3:  # show the slice of the first chosen tile
            step = list(self.viewer.dims.current_step)
            step[-3] = int(first[0])
            self.viewer.dims.current_step = tuple(step)
        self.status.setText(f"selected {len(sel)} tiles (median uncertainty {np.median(sel.pool_scores):.3f} over a "
                            f"pool of {len(sel.pool_scores)}); write the hand-off to annotate them")
        return sel

    def write_handoff(self, folder):
        """Write the annotation hand-off of the last selection into ``folder``; returns the folder."""
        from ..workflow import write_annotation

        if self.selection is None:
            raise ValueError("expected a selection first (Select tiles)")
        if not str(folder).strip():
            raise ValueError("expected an annotation folder to write")
        layer = self.image_layer()
        target = (layer.metadata or {}).get("path")
        out = write_annotation(self.selection, folder, target=target)
        self.status.setText(f"wrote {out}: open it in napari to proofread, then save the labels layer into it")
        return out
